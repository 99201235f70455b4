"""Cost-model profiles: parse the SpotServe artifact's per-layer JSON and spotserve's own superset.

Artifact format (../shared/data/README.md): ``layer_num``, ``final_fix_factor``, ``pp_init_comm`` /
``pp_incr_comm`` (ms per pipeline hop), ``embed`` (ms by log2 batch), and ``tp-<n>`` ->
``bsz-<b>`` -> ``init`` (ms per layer, 512-token prompt) / ``incr`` (ms per layer, one decode step).

Optional additions written by spotserve's own profiler (all keys optional, artifact files have none):
``model`` (spec name), ``dtype`` ("fp32" | "fp16" | "bf16"), ``init_tokens`` (prompt length of
``init``), ``gpu_memory_bytes``, ``gpus_per_instance``, ``reserved_bytes`` (per GPU, CUDA context and
workspace), ``bandwidth`` {``intra_bytes_per_s``, ``inter_bytes_per_s``, ``disk_bytes_per_s``},
``memory`` {``layer_bytes``, ``kv_bytes_per_token_layer``, ``embed_bytes``, ``head_bytes``,
``activation_bytes_per_token``} (measured figures override the ones derived from the spec).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

# Artifact profile names -> spotserve model specs (the shapes the artifact profiled).
PROFILE_SPECS = {
    "megatron_6.7B_profile": "opt-6.7b",
    "megatron_h6144_profile": "gpt-neox-20b",
    "megatron_h7168_profile": "paper-30b",
    "opt-6.7B": "opt-6.7b",
}
_TP = re.compile(r"^tp-(\d+)$")
_BSZ = re.compile(r"^bsz-(\d+)$")
_BW_KEYS = ("intra_bytes_per_s", "inter_bytes_per_s", "disk_bytes_per_s")
_MEM_KEYS = ("layer_bytes", "kv_bytes_per_token_layer", "embed_bytes", "head_bytes", "activation_bytes_per_token")


@dataclass(frozen=True)
class Profile:
    """Measured per-layer latencies (seconds) of one model shape on one GPU type."""

    name: str
    layer_num: int
    layer_times: dict[int, dict[int, tuple[float, float]]]  # tp -> batch -> (prefill s, decode s) per layer
    pp_init_comm: float  # s per pipeline hop during prefill
    pp_incr_comm: float  # s per pipeline hop during a decode step
    embed: tuple[float, ...] = ()  # s per embedding pass, index log2(batch)
    final_fix_factor: float = 1.0
    init_tokens: int = 512
    model: str | None = None
    dtype: str = "fp32"
    gpu_memory_bytes: int | None = None
    gpus_per_instance: int | None = None
    reserved_bytes: int | None = None
    bandwidth: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    # fixed cost of a reconfiguration (process groups, engine start): the controller plans a notice
    # against the deadline less this margin; measured by live profiles, 0 in the paper's T4 profiles
    reconfigure_margin_s: float = 0.0

    def __post_init__(self):
        where = f"profile {self.name}"
        if self.layer_num < 1:
            raise ValueError(f"{where}: layer_num must be >= 1")
        if not self.layer_times:
            raise ValueError(f"{where}: no tp-<n> entries")
        for tp, table in self.layer_times.items():
            if not table:
                raise ValueError(f"{where}: tp-{tp} has no bsz-<b> entries")
            for b, (init, incr) in table.items():
                if not (init > 0 and incr > 0):
                    raise ValueError(f"{where}: tp-{tp}/bsz-{b} times must be positive, got {init}, {incr}")
        if self.final_fix_factor <= 0 or self.pp_init_comm < 0 or self.pp_incr_comm < 0:
            raise ValueError(f"{where}: final_fix_factor must be > 0 and comm times >= 0")
        if not self.reconfigure_margin_s >= 0:
            raise ValueError(f"{where}: reconfigure_margin_s must be >= 0, got {self.reconfigure_margin_s}")
        if self.dtype not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"{where}: dtype must be fp32, fp16 or bf16, got {self.dtype!r}")
        for key in self.bandwidth:
            if key not in _BW_KEYS or not self.bandwidth[key] > 0:
                raise ValueError(f"{where}: bandwidth.{key} is unknown or not positive")
        for key in self.memory:
            if key not in _MEM_KEYS or self.memory[key] < 0:
                raise ValueError(f"{where}: memory.{key} is unknown or negative")

    @property
    def tps(self) -> list[int]:
        return sorted(self.layer_times)

    def batches(self, tp: int) -> list[int]:
        return sorted(self.layer_times[tp])


def _num(data: dict, key: str, where: str, default=None) -> float:
    value = data.get(key, default)
    if value is None:
        raise ValueError(f"{where}: missing field {key!r}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{where}: field {key!r} must be a number, got {value!r}")
    return float(value)


def parse_profile(data: dict, where: str = "profile") -> Profile:
    """Build a Profile from decoded JSON; raises ValueError naming ``where`` and the bad field."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: top level must be an object")
    times: dict[int, dict[int, tuple[float, float]]] = {}
    for key, table in data.items():
        m = _TP.match(key)
        if not m:
            continue
        if not isinstance(table, dict):
            raise ValueError(f"{where}: field {key!r} must be an object")
        tp = int(m.group(1))
        times[tp] = {}
        for bkey, entry in table.items():
            mb = _BSZ.match(bkey)
            if not mb or not isinstance(entry, dict):
                raise ValueError(f"{where}: field {key}.{bkey} is not bsz-<n> -> {{init, incr}}")
            # ms in the file, seconds inside spotserve
            times[tp][int(mb.group(1))] = (_num(entry, "init", f"{where}: {key}.{bkey}") / 1e3,
                                           _num(entry, "incr", f"{where}: {key}.{bkey}") / 1e3)
    embed = data.get("embed", [])
    if not isinstance(embed, list) or not all(isinstance(x, (int, float)) for x in embed):
        raise ValueError(f"{where}: field 'embed' must be a list of numbers")
    bandwidth = data.get("bandwidth", {})
    memory = data.get("memory", {})
    if not isinstance(bandwidth, dict) or not isinstance(memory, dict):
        raise ValueError(f"{where}: fields 'bandwidth' and 'memory' must be objects")
    name = str(data.get("name", where))
    opt_int = lambda k: None if data.get(k) is None else int(_num(data, k, where))  # noqa: E731
    return Profile(
        name=name,
        layer_num=int(_num(data, "layer_num", where)),
        layer_times=times,
        pp_init_comm=_num(data, "pp_init_comm", where, 0.0) / 1e3,
        pp_incr_comm=_num(data, "pp_incr_comm", where, 0.0) / 1e3,
        embed=tuple(x / 1e3 for x in embed),
        final_fix_factor=_num(data, "final_fix_factor", where, 1.0),
        init_tokens=int(_num(data, "init_tokens", where, 512)),
        model=data.get("model") or PROFILE_SPECS.get(name),
        dtype=str(data.get("dtype", "fp32")),
        gpu_memory_bytes=opt_int("gpu_memory_bytes"),
        gpus_per_instance=opt_int("gpus_per_instance"),
        reserved_bytes=opt_int("reserved_bytes"),
        bandwidth={k: float(v) for k, v in bandwidth.items()},
        memory={k: float(v) for k, v in memory.items()},
        reconfigure_margin_s=_num(data, "reconfigure_margin_s", where, 0.0),
    )


def load_profile(path: str | Path) -> Profile:
    """Read a profile JSON file; raises ValueError naming the file on bad content."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from exc
    return parse_profile(data, where=str(path))
