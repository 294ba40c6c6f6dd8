"""All replicas the gateway serves, found by model id or alias.

One replica per model for now (the config refuses `max_replicas` > 1).
"""

from __future__ import annotations

import asyncio
import logging

import httpx

from dormant.config import ModelSpec, ServerConfig
from dormant.errors import ModelNotFound
from dormant.lifecycle.controller import ReplicaController
from dormant.lifecycle.policy import start_timeout
from dormant.lifecycle.process import WorkerProcess
from dormant.lifecycle.states import Observer
from dormant.lifecycle.watchdog import LivenessProbe
from dormant.lifecycle.zygote import ZygoteClient

log = logging.getLogger("dormant.lifecycle")


class Fleet:
    def __init__(self, cfg: ServerConfig, client: httpx.AsyncClient, observer: Observer | None = None) -> None:
        self.cfg = cfg
        store_root = cfg.store_path()
        env = {"DORMANT_HOME": str(store_root)}
        # the standby worker holds a CUDA context: only where a model may run on the GPU; it
        # preloads those models' tokenizers
        on_gpu = [spec.source for spec in cfg.models if spec.engine_args.get("device", "auto") != "cpu"]
        standby = "auto" if cfg.standby_worker and on_gpu else "off"
        self.zygote = ZygoteClient(env, standby=standby, standby_sources=on_gpu) if cfg.zygote else None

        read_timeout = cfg.worker_read_timeout if cfg.worker_read_timeout >= 0 else None

        async def launch(spec: ModelSpec) -> WorkerProcess:
            return await WorkerProcess.launch(spec, http=client, env=env, zygote=self.zygote, read_timeout=read_timeout)

        interval = cfg.worker_health_interval
        liveness = LivenessProbe(interval, interval, cfg.worker_health_failures) if interval > 0 else None
        self._replicas = {
            spec.id: ReplicaController(spec, launch=launch, start_timeout=start_timeout(spec, store_root),
                                       observer=observer, liveness=liveness)
            for spec in cfg.models
        }

    def start(self) -> None:
        if self.zygote is not None:
            self.zygote.start()  # in the background; starts before it is up are spawned
        for replica in self._replicas.values():
            replica.start()

    def resolve(self, name: str) -> ReplicaController:
        """The replica serving `name` (an id or an alias); ModelNotFound (404) otherwise."""
        spec = self.cfg.model(name)
        if spec is None:
            raise ModelNotFound(f"The model '{name}' does not exist", param="model")
        return self._replicas[spec.id]

    def replicas(self) -> list[ReplicaController]:
        return list(self._replicas.values())

    async def unload(self, name: str | None = None) -> list[str]:
        """Drain and stop one model's worker (or all); returns the model ids unloaded."""
        targets = [self.resolve(name)] if name else self.replicas()
        await asyncio.gather(*(r.unload() for r in targets))
        return [r.spec.id for r in targets]

    async def shutdown(self) -> None:
        await asyncio.gather(*(r.shutdown() for r in self._replicas.values()), return_exceptions=True)
        if self.zygote is not None:
            await self.zygote.stop()
