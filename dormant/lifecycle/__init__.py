"""Per-replica lifecycle: states, the controller that owns them, idle policy, worker processes.

    states.py      State, Ticket, ReplicaSnapshot, the Observer hook (metrics)
    controller.py  ReplicaController: one asyncio task per replica owns its state
    commands.py    the typed commands the controller's task handles
    machine.py     the replica's state and what each command does to it
    admission.py   held and running requests; idle.py  the idle clock
    operations.py  the worker operations (start, sleep, wake, hibernate, stop)
    worker.py      the Worker and Clock protocols the controller sees
    policy.py      when: idle tiers (sleep_after, stop_after, keep_alive), start timeouts
    process.py     how: launch a worker on a free loopback port, wait healthy, stop
    fleet.py       every replica, resolved by model id or alias

Dependencies point one way: gateway -> lifecycle -> store. Never imports torch.
"""
