"""``matrixinfer-sim``: run one simulated engine, or a fleet of them on loopback addresses.

matrixinfer-sim --model demo-model --host 127.0.0.10 --port 8000 [engine flags]
matrixinfer-sim fleet --replicas 4 [--first-host 127.0.0.10] [--port 8000] [engine flags]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from sim.config import EngineConfig, FaultConfig, SimConfig, TimingModel
from sim.kvevents import KV_EVENTS_FORMATS, KVEventsConfig

__all__ = ["build_config", "fleet_parser", "main", "serve_parser"]


LOG_LEVELS = ("debug", "info", "warning", "error")  # as every MatrixInfer program spells them

# Durations are written as everywhere in MatrixInfer (500ms, 2s, 1m30s; a bare number is
# seconds). The simulator stands alone (it imports no MatrixInfer package), hence its own parser.
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
_DURATION = re.compile(r"^(?:[0-9]+(?:\.[0-9]+)?(?:ns|us|ms|s|m|h))+$")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|ms|s|m|h)")


def _version() -> str:
    try:
        return importlib.metadata.version("matrixinfer")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _duration(text: str) -> float:
    """argparse type: seconds in ``500ms`` / ``2s`` / ``1m30s``, or a bare number of seconds."""
    try:
        seconds = float(text)
    except ValueError:
        if not _DURATION.match(text.strip()):
            raise argparse.ArgumentTypeError(
                f"invalid duration {text!r}: use a number and a unit, e.g. 500ms, 2s, 1m30s"
            ) from None
        return sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(text))
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be 0 or more")
    return seconds


def _shown(seconds: float) -> str:
    """A default duration as the flags write it: 0.01 -> 10ms."""
    if seconds == 0:
        return "0s"
    for unit, size in _UNITS.items():
        count = seconds / size
        if count >= 1 and abs(count - round(count)) < 1e-6 * count:
            return f"{round(count)}{unit}"
    return f"{seconds:g}s"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default (flags, ``None`` defaults and helps that state
    theirs in words excepted)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool) or action.default == []:
            return action.help
        if "(default" in (action.help or ""):  # the help says it in words
            return action.help
        return super()._get_help_string(action)

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        return (
            "DURATION"
            if action.type is _duration
            else super()._get_default_metavar_for_optional(action)
        )


_LORA_JSON_KEYS = {"name", "path", "base_model_name"}


def _lora_module(spec: str) -> tuple[str, str]:
    """One ``--lora-modules`` value in vLLM's forms: ``NAME=PATH`` or
    ``{"name": ..., "path": ..., "base_model_name": ...}`` (the simulator serves every adapter on
    its one model, so ``base_model_name`` is accepted and not used)."""
    if spec.lstrip().startswith("{"):
        try:
            obj = json.loads(spec)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{spec!r}: invalid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise argparse.ArgumentTypeError(f"{spec!r}: expected a JSON object")
        unknown = sorted(set(obj) - _LORA_JSON_KEYS)
        if unknown:
            raise argparse.ArgumentTypeError(
                f"{spec!r}: unknown keys {unknown}; known: {sorted(_LORA_JSON_KEYS)}"
            )
        name, path = obj.get("name"), obj.get("path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise argparse.ArgumentTypeError(
                f'{spec!r}: "name" and "path" must be non-empty strings'
            )
        return name, path
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(
            f'expected NAME=PATH or {{"name": ..., "path": ...}}, got {spec!r}'
        )
    return name, path


def _kv_events_config(text: str) -> KVEventsConfig:
    try:
        return KVEventsConfig.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e.get('loc', ())) or 'value'}: {e.get('msg')}"
            for e in exc.errors()
        )
        raise argparse.ArgumentTypeError(f"--kv-events-config: {problems}") from None


def serve_parser() -> argparse.ArgumentParser:
    t, e, f = TimingModel(), EngineConfig(), FaultConfig()
    p = argparse.ArgumentParser(
        prog="matrixinfer-sim",
        description="A vLLM / SGLang engine simulator (OpenAI API, metrics, batching, KV cache). "
        "Run 'matrixinfer-sim fleet --help' for the fleet launcher. Durations: 500ms, 2s, 1m30s "
        "(a bare number is seconds).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    g = p.add_argument_group("serving")
    g.add_argument("--model", default="demo-model", help="served model name")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="as vLLM: the name the API serves (wins over --model)")  # fmt: skip
    g.add_argument("--host", default="127.0.0.1", help="address to bind")
    g.add_argument("--port", type=int, default=8000, help="port")
    g.add_argument(
        "--grpc-port",
        type=int,
        default=0,
        help="port of the Open Inference Protocol v2 gRPC service (0: off)",
    )
    g.add_argument("--pod-name", default="", help="x-inference-pod value (default: $POD_NAME)")
    g.add_argument("--engine", choices=["vllm", "sglang"], default="vllm",
                   help="API flavour and metric names")  # fmt: skip
    g.add_argument("--role", choices=["prefill", "decode", "both"], default="both",
                   help="prefill/decode disaggregation role")  # fmt: skip
    g.add_argument("--time-scale", type=float, default=1.0,
                   help="wall seconds per simulated second (0.01 = 100x faster)")  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="seed of output lengths/texts, faults")
    g.add_argument("--output-len", default="uniform:32:256",
                   help="output length without max_tokens: fixed:N | uniform:LO:HI | "
                   "normal:MEAN:STD | exponential:MEAN")  # fmt: skip
    g.add_argument("--log-level", default="info", choices=LOG_LEVELS, type=str.lower,
                   help="log level")  # fmt: skip
    g = p.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=int, default=e.max_num_seqs,
                   help="sequences in one running batch")  # fmt: skip
    g.add_argument("--max-num-batched-tokens", type=int, default=e.max_num_batched_tokens,
                   help="tokens in one engine step")  # fmt: skip
    g.add_argument("--num-gpu-blocks", "--num-gpu-blocks-override", type=int,
                   default=e.num_gpu_blocks, help="KV-cache blocks")  # fmt: skip
    g.add_argument("--block-size", type=int, default=e.block_size, help="tokens per KV block")
    g.add_argument("--max-model-len", type=int, default=e.max_model_len,
                   help="longest prompt + output, tokens")  # fmt: skip
    g.add_argument("--no-enable-prefix-caching", dest="prefix_caching", action="store_false",
                   help="turn the prefix cache off")  # fmt: skip
    g.add_argument("--enable-prefix-caching", dest="prefix_caching", action="store_true",
                   help="prefix cache on (the default)")  # fmt: skip
    g.add_argument("--max-waiting", type=int, default=None,
                   help="waiting-queue bound; over it: 429 (default: none)")  # fmt: skip
    g.add_argument("--max-loras", type=int, default=e.max_loras,
                   help="distinct LoRA adapters in one running batch")  # fmt: skip
    g.add_argument(
        "--max-cpu-loras", type=int, default=None, help="max loaded adapters (default: any)"
    )
    g.add_argument("--lora-modules", nargs="*", type=_lora_module, default=[],
                   metavar="NAME=PATH|JSON",
                   help='adapters loaded at start, as vLLM: NAME=PATH or '
                   '{"name": ..., "path": ..., "base_model_name": ...}')  # fmt: skip
    g.add_argument("--nixl-side-channel-port", type=int, default=5600,
                   help="NIXL side-channel port a decode pod reports")  # fmt: skip
    g.add_argument("--prefix-caching-hash-algo", default=e.prefix_caching_hash_algo,
                   choices=["sha256", "sha256_cbor", "builtin"],
                   help="block hash function, as vLLM's; the first block's parent is "
                   "hash(PYTHONHASHSEED), random when unset (default %(default)s)")  # fmt: skip
    g.add_argument("--kv-events-config", type=_kv_events_config, default=None,
                   metavar="JSON", help="KV events as vLLM publishes them, e.g. "
                   '\'{"enable_kv_cache_events": true, "publisher": "zmq", '
                   '"endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}\' '
                   "(default: off); $VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0 sends whole digests "
                   "instead of their low 64 bits, as vLLM")  # fmt: skip
    g.add_argument("--kv-events-format", choices=list(KV_EVENTS_FORMATS), default="array",
                   help="KV events on the wire: 'array' (msgpack arrays, as earlier vLLM "
                   "releases) or 'map' (tagged maps, as vLLM 0.31; what vllm-router kv_aware "
                   "reads) (default %(default)s)")  # fmt: skip
    g = p.add_argument_group("timing model (simulated time)")
    g.add_argument("--step-base", type=_duration, default=_shown(t.step_base),
                   help="fixed cost of one engine step")  # fmt: skip
    g.add_argument("--prefill-per-token", type=_duration, default=_shown(t.prefill_per_token),
                   help="cost per prefilled token")  # fmt: skip
    g.add_argument("--decode-per-seq", type=_duration, default=_shown(t.decode_per_seq),
                   help="cost per decoding sequence in a step")  # fmt: skip
    g.add_argument("--kv-transfer-base", type=_duration, default=_shown(t.kv_transfer_base),
                   help="fixed cost of a PD KV transfer")  # fmt: skip
    g.add_argument("--kv-transfer-per-token", type=_duration,
                   default=_shown(t.kv_transfer_per_token),
                   help="PD KV transfer cost per prompt token")  # fmt: skip
    g = p.add_argument_group("faults")
    g.add_argument("--error-rate", type=float, default=f.error_rate, help="fraction answered 500")
    g.add_argument("--reset-rate", type=float, default=f.reset_rate,
                   help="fraction whose connection is reset")  # fmt: skip
    g.add_argument("--hang-rate", type=float, default=f.hang_rate,
                   help="fraction never answered")  # fmt: skip
    g.add_argument("--slow-start", type=_duration, default="0s",
                   help="how long /health (and generation) answer 503 after start")  # fmt: skip
    g.add_argument("--not-ready", action="store_true", help="start with /health answering 503")
    p.set_defaults(prefix_caching=True)
    return p


def build_config(ns: argparse.Namespace) -> SimConfig:
    """Namespace -> validated SimConfig (raises pydantic.ValidationError)."""
    timing = TimingModel(
        step_base=ns.step_base,
        prefill_per_token=ns.prefill_per_token,
        decode_per_seq=ns.decode_per_seq,
        kv_transfer_base=ns.kv_transfer_base,
        kv_transfer_per_token=ns.kv_transfer_per_token,
    )
    engine = EngineConfig(
        max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        num_gpu_blocks=ns.num_gpu_blocks,
        block_size=ns.block_size,
        enable_prefix_caching=ns.prefix_caching,
        max_model_len=ns.max_model_len,
        max_waiting=ns.max_waiting,
        max_loras=ns.max_loras,
        prefix_caching_hash_algo=ns.prefix_caching_hash_algo,
        hash_seed=os.environ.get("PYTHONHASHSEED"),
        kv_events_int_block_hashes=_env_flag("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", True),
        timing=timing,
    )
    faults = FaultConfig(
        error_rate=ns.error_rate,
        reset_rate=ns.reset_rate,
        hang_rate=ns.hang_rate,
        not_ready=ns.not_ready,
    )
    return SimConfig(
        model=_served_name(ns),
        host=ns.host,
        port=ns.port,
        grpc_port=ns.grpc_port,
        pod_name=ns.pod_name,
        engine_kind=ns.engine,
        role=ns.role,
        time_scale=ns.time_scale,
        seed=ns.seed,
        output_len=ns.output_len,
        engine=engine,
        faults=faults,
        slow_start=ns.slow_start,
        max_cpu_loras=ns.max_cpu_loras,
        lora_modules=dict(ns.lora_modules),
        nixl_side_channel_port=ns.nixl_side_channel_port,
        kv_events=ns.kv_events_config or KVEventsConfig(),
        kv_events_format=ns.kv_events_format,
    )


def _env_flag(name: str, default: bool) -> bool:
    """A 0/1 environment switch read as vLLM reads it (``bool(int(value))``)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return bool(int(value))
    except ValueError:
        raise SystemExit(f"${name}: expected 0 or 1, got {value!r}") from None


def _served_name(ns: argparse.Namespace) -> str:
    names: list[str] | None = ns.served_model_name
    if not names:
        return str(ns.model)
    if len(names) > 1:
        raise SystemExit(
            f"matrixinfer-sim: --served-model-name: the simulator serves one name, got {names}"
        )
    return names[0]


def _config_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        lines.append(f"  {loc or 'config'}: {err.get('msg')}")
    return "matrixinfer-sim: invalid configuration:\n" + "\n".join(lines)


def _serve(argv: Sequence[str]) -> int:
    ns = serve_parser().parse_args(list(argv))
    try:
        cfg = build_config(ns)
    except ValidationError as exc:
        print(_config_error(exc), file=sys.stderr)
        return 2
    logging.basicConfig(
        level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from sim.server import serve

    try:
        import uvloop

        uvloop.run(serve(cfg))
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(serve(cfg))
    return 0


def fleet_parser() -> argparse.ArgumentParser:
    """``matrixinfer-sim fleet``'s own flags (the rest go to every replica)."""
    p = argparse.ArgumentParser(
        prog="matrixinfer-sim fleet",
        description="Start N simulators, each on its own loopback address and the same port "
        "(as pods would be); any other flag is passed to every replica.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--replicas", type=int, default=4, help="simulators")
    p.add_argument("--model", default="demo-model", help="served model name")
    p.add_argument("--port", type=int, default=8000, help="port of every replica")
    p.add_argument("--first-host", default="127.0.0.10", help="address of the first replica")
    p.add_argument("--name-prefix", default="sim", help="replica names: PREFIX-0, PREFIX-1, ...")
    p.add_argument("--log-dir", type=Path, default=None, help="a log file per replica here")
    p.add_argument("--ready-timeout", type=_duration, default="30s",
                   help="how long a replica may take to answer /health")  # fmt: skip
    return p


def _fleet(argv: Sequence[str]) -> int:
    ns, rest = fleet_parser().parse_known_args(list(argv))
    # validate the pass-through flags now, with the same parser each replica uses
    try:
        build_config(serve_parser().parse_args([*rest, "--model", ns.model]))
    except ValidationError as exc:
        print(_config_error(exc), file=sys.stderr)
        return 2
    from sim.fleet import Fleet

    fleet = Fleet(
        ns.replicas,
        model=ns.model,
        port=ns.port,
        first_host=ns.first_host,
        args=rest,
        log_dir=ns.log_dir,
        name_prefix=ns.name_prefix,
        ready_timeout=ns.ready_timeout,
    )

    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    with fleet:
        for pod in fleet.pods:
            print(f"{pod.name}\t{pod.url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "fleet":
        return _fleet(args[1:])
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
