"""``matrixinfer-sim``: run one simulated engine, or a fleet of them on loopback addresses.

matrixinfer-sim --model demo-model --host 127.0.0.10 --port 8000 [engine flags]
matrixinfer-sim fleet --replicas 4 [--first-host 127.0.0.10] [--port 8000] [engine flags]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from sim.config import EngineConfig, FaultConfig, SimConfig, TimingModel
from sim.kvevents import KVEventsConfig

__all__ = ["build_config", "main", "serve_parser"]


def _lora_module(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora-modules expects NAME=PATH, got {spec!r}")
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
        "Run 'matrixinfer-sim fleet --help' for the fleet launcher.",
    )
    g = p.add_argument_group("serving")
    g.add_argument("--model", default="demo-model", help="served model name (default %(default)s)")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    g.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    g.add_argument("--pod-name", default="", help="x-inference-pod value (default: $POD_NAME)")
    g.add_argument("--engine", choices=["vllm", "sglang"], default="vllm",
                   help="API flavour and metric names (default %(default)s)")  # fmt: skip
    g.add_argument("--role", choices=["prefill", "decode", "both"], default="both",
                   help="prefill/decode disaggregation role (default %(default)s)")  # fmt: skip
    g.add_argument("--time-scale", type=float, default=1.0,
                   help="wall seconds per simulated second (0.01 = 100x faster)")  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="seed of output lengths/texts, faults")
    g.add_argument("--output-len", default="uniform:32:256",
                   help="output length without max_tokens: fixed:N | uniform:LO:HI | "
                   "normal:MEAN:STD | exponential:MEAN (default %(default)s)")  # fmt: skip
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g = p.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=int, default=e.max_num_seqs)
    g.add_argument("--max-num-batched-tokens", type=int, default=e.max_num_batched_tokens)
    g.add_argument("--num-gpu-blocks", type=int, default=e.num_gpu_blocks)
    g.add_argument("--block-size", type=int, default=e.block_size)
    g.add_argument("--max-model-len", type=int, default=e.max_model_len)
    g.add_argument("--no-enable-prefix-caching", dest="prefix_caching", action="store_false")
    g.add_argument("--enable-prefix-caching", dest="prefix_caching", action="store_true")
    g.add_argument("--max-waiting", type=int, default=None,
                   help="waiting-queue bound; over it: 429 (default: none)")  # fmt: skip
    g.add_argument("--max-loras", type=int, default=e.max_loras,
                   help="distinct LoRA adapters in one running batch")  # fmt: skip
    g.add_argument("--max-cpu-loras", type=int, default=None, help="max loaded adapters")
    g.add_argument("--lora-modules", nargs="*", type=_lora_module, default=[],
                   metavar="NAME=PATH", help="adapters loaded at start")  # fmt: skip
    g.add_argument("--nixl-side-channel-port", type=int, default=5600)
    g.add_argument("--prefix-caching-hash-algo", default=e.prefix_caching_hash_algo,
                   choices=["sha256", "sha256_cbor", "builtin"],
                   help="block hash function, as vLLM's; the first block's parent is "
                   "hash(PYTHONHASHSEED), random when unset (default %(default)s)")  # fmt: skip
    g.add_argument("--kv-events-config", type=_kv_events_config, default=KVEventsConfig(),
                   metavar="JSON", help="KV events as vLLM publishes them, e.g. "
                   '\'{"enable_kv_cache_events": true, "publisher": "zmq", '
                   '"endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}\'')  # fmt: skip
    g = p.add_argument_group("timing model (simulated seconds)")
    g.add_argument("--step-base", type=float, default=t.step_base)
    g.add_argument("--prefill-per-token", type=float, default=t.prefill_per_token)
    g.add_argument("--decode-per-seq", type=float, default=t.decode_per_seq)
    g.add_argument("--kv-transfer-base", type=float, default=t.kv_transfer_base)
    g.add_argument("--kv-transfer-per-token", type=float, default=t.kv_transfer_per_token)
    g = p.add_argument_group("faults")
    g.add_argument("--error-rate", type=float, default=f.error_rate, help="fraction answered 500")
    g.add_argument("--reset-rate", type=float, default=f.reset_rate,
                   help="fraction whose connection is reset")  # fmt: skip
    g.add_argument("--hang-rate", type=float, default=f.hang_rate,
                   help="fraction never answered")  # fmt: skip
    g.add_argument("--slow-start", type=float, default=0.0,
                   help="seconds /health (and generation) answer 503 after start")  # fmt: skip
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
        timing=timing,
    )
    faults = FaultConfig(
        error_rate=ns.error_rate,
        reset_rate=ns.reset_rate,
        hang_rate=ns.hang_rate,
        not_ready=ns.not_ready,
    )
    return SimConfig(
        model=ns.model,
        host=ns.host,
        port=ns.port,
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
        kv_events=ns.kv_events_config,
    )


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


def _fleet(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="matrixinfer-sim fleet",
        description="Start N simulators, each on its own loopback address and the same port "
        "(as pods would be); any other flag is passed to every replica.",
    )
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--model", default="demo-model")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--first-host", default="127.0.0.10")
    p.add_argument("--name-prefix", default="sim")
    p.add_argument("--log-dir", type=Path, default=None)
    p.add_argument("--ready-timeout", type=float, default=30.0)
    ns, rest = p.parse_known_args(list(argv))
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
