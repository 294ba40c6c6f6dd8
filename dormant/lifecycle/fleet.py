"""All replicas the gateway serves, found by model id or alias, placed within the budgets.

One replica per model for now (the config refuses `max_replicas` > 1). The placer
(placer.py) decides where each runs and whom it evicts; models that share a GPU get a KV
allotment each (budgets.with_default_kv).
"""

from __future__ import annotations

import asyncio
import logging
import os

import httpx

from dormant.config import ModelSpec, ServerConfig
from dormant.errors import ModelNotFound
from dormant.lifecycle import budgets
from dormant.lifecycle.checkpoint import CudaCheckpoint
from dormant.lifecycle.controller import ReplicaController
from dormant.lifecycle.placer import Placer
from dormant.lifecycle.policy import start_timeout
from dormant.lifecycle.process import WorkerProcess
from dormant.lifecycle.states import Observer
from dormant.lifecycle.watchdog import LivenessProbe
from dormant.lifecycle.zygote import ZygoteClient

log = logging.getLogger("dormant.lifecycle")


class Fleet:
    def __init__(self, cfg: ServerConfig, client: httpx.AsyncClient, observer: Observer | None = None) -> None:
        store_root = cfg.store_path()
        limits = budgets.limits(cfg)
        cfg = _with_kv_allotments(cfg, limits)
        self.cfg = cfg
        self.placer = Placer(limits, store_root, observer, disk=budgets.StoreDisk.of(cfg))
        log.info("budgets: %s", ", ".join(f"{d} {v / 2**30:.1f} GiB" for d, v in limits.device.items())
                 + f"; host {limits.host / 2**30:.1f} GiB; disk {limits.disk / 2**30:.1f} GiB now "
                   "(it follows the disk's free space)")
        env = {"DORMANT_HOME": str(store_root)}
        # the standby worker holds a CUDA context: only where a model may run on the GPU; it
        # preloads those models' tokenizers
        on_gpu = [spec.source for spec in cfg.models if spec.engine_args.get("device", "auto") != "cpu"]
        standby = "auto" if cfg.standby_worker and on_gpu else "off"
        self.zygote = ZygoteClient(env, standby=standby, standby_sources=on_gpu) if cfg.zygote else None

        read_timeout = cfg.worker_read_timeout if cfg.worker_read_timeout >= 0 else None

        async def launch(spec: ModelSpec) -> WorkerProcess:
            device = self.replicas_by_id[spec.id].snapshot().device or ""
            gpu_env = _gpu_env(device)
            # the zygote's standby worker holds a context on the first GPU: another GPU spawns
            zygote = self.zygote if not gpu_env else None
            return await WorkerProcess.launch(spec, http=client, env={**env, **gpu_env}, zygote=zygote,
                                              read_timeout=read_timeout)

        suspender = CudaCheckpoint()  # one for the fleet: the driver is initialized once
        interval = cfg.worker_health_interval
        liveness = LivenessProbe(interval, interval, cfg.worker_health_failures) if interval > 0 else None
        self._replicas = {
            spec.id: ReplicaController(spec, launch=launch, start_timeout=start_timeout(spec, store_root),
                                       observer=self.placer, liveness=liveness, room=self.placer,
                                       suspender=suspender)
            for spec in cfg.models
        }
        self.replicas_by_id = self._replicas
        for replica in self._replicas.values():
            self.placer.add(replica)

    def start(self) -> None:
        if self.zygote is not None:
            self.zygote.start()  # in the background; starts before it is up are spawned
        for replica in self._replicas.values():
            replica.start()
        for model_id in self.cfg.preload:
            self._replicas[model_id].preload()

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


def _with_kv_allotments(cfg: ServerConfig, limits) -> ServerConfig:
    """Models that may share a GPU get a KV allotment each unless they name one."""
    from dataclasses import replace

    users: dict[str, int] = {}
    for spec in cfg.models:
        for device in budgets.candidate_devices(spec, limits):
            users[device] = users.get(device, 0) + 1
    models = tuple(budgets.with_default_kv(spec, any(users[d] > 1 for d in budgets.candidate_devices(spec, limits)
                                                     if d.startswith("cuda:")))
                   for spec in cfg.models)
    return replace(cfg, models=models)


def _gpu_env(device: str) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for a worker placed on a GPU other than the first."""
    if not device.startswith("cuda:") or device == "cuda:0":
        return {}
    index = int(device.split(":")[1])
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return {"CUDA_VISIBLE_DEVICES": visible[index] if index < len(visible) else str(index)}
