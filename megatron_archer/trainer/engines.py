"""The rollout engine a config asks for (built on global rank 0 only)."""

from __future__ import annotations

import torch

from megatron_archer.rollout import LocalEngine, RolloutEngine, SGLangEngine
from megatron_archer.trainer.config import ExperimentConfig


def build_engine(config: ExperimentConfig) -> RolloutEngine:
    """``local``: transformers on this process's GPU (CPU without one), loading ``model.path``;
    ``sglang``: launched here or attached to by URL (``rollout.sglang``); with
    ``weight_sync: distributed``, joined to this process by the NCCL weight-update group
    (``master_address``/``master_port``, needs CUDA) before the first weight sync."""
    rollout, path = config.rollout, config.model.path
    if rollout.engine == "local":
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        return LocalEngine(path, device=device, dtype=getattr(torch, rollout.dtype))
    sg = rollout.sglang
    options = dict(weight_sync=sg.weight_sync, bucket_bytes=sg.bucket_bytes,
                   disk_dir=sg.disk_dir, base_model_path=path)
    if sg.launch:
        engine = SGLangEngine.launch(path, num_servers=sg.num_servers, base_port=sg.base_port,
                                     tp_size=sg.tp_size, extra_args=sg.extra_args, **options)
    else:
        engine = SGLangEngine(sg.server_urls, router_url=sg.router_url, tp_size=sg.tp_size,
                              **options)
    if sg.weight_sync == "distributed":
        try:
            engine.init_weight_update_group(sg.master_address, sg.master_port)
        except BaseException:
            engine.shutdown()  # the servers launched here; attached ones are left running
            raise
    return engine
