"""Cost of one training step per objective at the shipped configs' default size (``configs/<method>_<D>d.yaml``).

For each registered objective and dimension: seconds per step (fastest of a few) (objective forward + backward + optimizer step +
``on_step_end``), its ratio to the floor (the bare network's forward + backward on the same two views) and to the
teacher floor (the floor plus the forward of the objective's EMA teacher networks on both views, which a teacher
method cannot avoid; equal to the floor for methods without a teacher), and peak memory (CPU: the process's peak resident set, so every case runs in its own subprocess; CUDA: max allocated).
The batch comes from the real view sampler on a small demo population and is reused for every timed step, so
view generation is not counted (``benchmarks.bench_views`` measures it).
``--profile`` also runs one step under ``torch.profiler``: the share of the step in the objective's forward, the
backward pass and the optimizer + EMA update, and the operators that take the most time with their input shapes
(where the time goes, ``format_profile``).

Run: ``python -m benchmarks.bench_objectives [--device cpu|cuda] [--dims 2 3] [--steps 3] [--batch N] [--profile]``;
prints Markdown tables (the numbers in ``docs/pretraining.md`` come from it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.common import ROOT, argument_parser, synchronise
from medssl.report.markdown import markdown_table

MODULE = "benchmarks.bench_objectives"


def _timed(steps: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Fastest seconds of each ``steps[name]()`` over ``repeats`` rounds after one warm-up round; the calls
    alternate and the minimum is kept, so load from other processes affects both alike and little."""
    best = {name: float("inf") for name in steps}
    for round_index in range(repeats + 1):
        for name, step in steps.items():
            synchronise(device)
            start = time.perf_counter()
            step()
            synchronise(device)
            if round_index:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def measure(method: str, spatial_dims: int, data: Path, device: torch.device, steps: int, batch: int | None,
            overrides: Sequence[str] = (), profile: bool = False) -> dict:
    """Seconds per step of ``method`` and of the floor, and peak memory in MiB, at its config's default size
    (``overrides``: extra ``key=value`` config overrides; ``profile``: add ``profile_step``'s summary)."""
    from medssl.engine.pretrain import TrainStep, build_objectives, build_sampler, network_from_config
    from medssl.config import shipped_config
    from medssl.engine.pretrain_config import read_pretrain_config
    from medssl.engine.schedule import build_optimizer

    overrides = [f"data.path={data}", *overrides] + ([f"train.batch_size={batch}"] if batch else [])
    config = read_pretrain_config(shipped_config(f"{method}_{spatial_dims}d"), overrides)
    torch.manual_seed(config.seed)
    network = network_from_config(config).to(device)
    objectives, weights = build_objectives(config, network)
    model = TrainStep(network, objectives, weights).to(device).train()
    views = build_sampler(config, objectives, device=device).sample(config.train.batch_size)
    optimizer = build_optimizer([model], name=config.train.optimizer, lr=config.train.lr, weight_decay=0.0)

    teachers = [module for objective in objectives.values() for module in objective.modules()
                if type(module) is type(network) and module is not network]  # EMA copies of the network

    def floor_step() -> None:
        network.zero_grad(set_to_none=True)
        (network(views.a.image).mean() + network(views.b.image).mean()).backward()

    def teacher_floor_step() -> None:
        floor_step()
        with torch.no_grad():
            for teacher in teachers:
                teacher(views.a.image), teacher(views.b.image)

    def objective_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(views)["loss"].backward()
        optimizer.step()
        for objective in objectives.values():
            objective.on_step_end(network, 0.5)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cases = {"floor": floor_step, "step": objective_step, **({"teacher_floor": teacher_floor_step} if teachers else {})}
    timings = _timed(cases, steps, device)
    floor_s, step_s = timings["floor"], timings["step"]
    teacher_floor_s = timings.get("teacher_floor", floor_s)
    peak_mib = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return {"method": method, "dims": spatial_dims, "patch": list(config.data["patch_size"]),
            "batch": config.train.batch_size, "step_s": step_s, "floor_s": floor_s, "teacher_floor_s": teacher_floor_s,
            "teachers": len(teachers), "peak_mib": peak_mib,
            **({"profile": profile_step(model, views, optimizer, objectives, network, device)} if profile else {})}


#: the phases of a step in ``profile_step``
PHASES = ("forward", "backward", "optimizer + EMA")


def profile_step(model: torch.nn.Module, views, optimizer, objectives: dict, network: torch.nn.Module,
                 device: torch.device, top: int = 5) -> dict:
    """One objective step under ``torch.profiler``: seconds per phase (``PHASES``) and the ``top`` operators by
    self time (CPU, or CUDA on a GPU), each with its input shapes, calls and share of the step."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    optimizer.zero_grad(set_to_none=True)
    with profile(activities=activities, record_shapes=True) as profiler:
        with record_function(PHASES[0]):
            loss = model(views)["loss"]
        with record_function(PHASES[1]):
            loss.backward()
        with record_function(PHASES[2]):
            optimizer.step()
            for objective in objectives.values():
                objective.on_step_end(network, 0.5)
        synchronise(device)
    self_time = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    phases = {event.key: event.cpu_time_total / 1e6 for event in profiler.key_averages() if event.key in PHASES}
    ops = [event for event in profiler.key_averages(group_by_input_shape=True)
           if event.key not in PHASES and not event.key.startswith(("autograd::", "ProfilerStep"))]
    ops.sort(key=lambda event: -getattr(event, self_time))
    total = sum(phases.values()) or 1.0
    return {"phases": phases, "ops": [
        {"op": event.key.removeprefix("aten::"), "shapes": [list(shape) for shape in event.input_shapes if shape],
         "calls": event.count, "share": getattr(event, self_time) / 1e6 / total} for event in ops[:top]]}


def measure_all(dims: Sequence[int] = (2, 3), device: str | torch.device = "cpu", steps: int = 3,
                batch: int | None = None, methods: Sequence[str] | None = None, overrides: Sequence[str] = (),
                isolate: bool = True, profile: bool = False) -> list[dict]:
    """``measure`` of every registered objective (or ``methods``) per dimension on a 2-subject demo population.
    ``isolate``: each case in its own subprocess, so the CPU peak memory is that case's alone (else in this
    process: faster, but the peak is the process's so far)."""
    from medssl.data.demo import write_demo_dataset
    from medssl.objectives import OBJECTIVES

    rows = []
    # the child runs this module by name from any working directory: the repository root goes on its PYTHONPATH
    child_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        for spatial_dims in dims:
            data = write_demo_dataset(Path(tmp) / f"demo{spatial_dims}d", spatial_dims=spatial_dims, n_subjects=2)
            for method in methods or OBJECTIVES.names():
                if not isolate:
                    rows.append(measure(method, spatial_dims, data, torch.device(device), steps, batch, overrides,
                                        profile))
                    continue
                command = [sys.executable, "-m", MODULE, "--device", str(device), "--steps", str(steps),
                           "--one", method, str(spatial_dims), str(data)] + (["--batch", str(batch)] if batch else [])
                command += ["--profile"] if profile else []
                command += [f"--set={override}" for override in overrides]
                result = subprocess.run(command, capture_output=True, text=True, check=True, env=child_env)
                rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return rows


def format_rows(rows: list[dict]) -> str:
    header = ["method", "D", "patch", "batch", "s/step", "floor s/step", "ratio", "teacher floor s/step",
              "ratio to teacher floor", "peak MiB"]
    return "\n".join(markdown_table(header, [
        [r["method"], str(r["dims"]), "x".join(map(str, r["patch"])), str(r["batch"]), f"{r['step_s']:.3f}",
         f"{r['floor_s']:.3f}", f"{r['step_s'] / r['floor_s']:.1f}",
         f"{r.get('teacher_floor_s', r['floor_s']):.3f}" + ("" if r.get("teachers") else " (no teacher)"),
         f"{r['step_s'] / r.get('teacher_floor_s', r['floor_s']):.2f}", f"{r['peak_mib']:.0f}"] for r in rows]))


def format_profile(rows: list[dict]) -> str:
    """Where a step's time goes, one row per profiled case: phase shares and the top operators (share, calls,
    input shapes)."""
    header = ["method", "D", *[f"{phase} %" for phase in PHASES],
              "top operators (share of the step; calls; input shapes)"]
    table = []
    for row in rows:
        if "profile" not in row:
            continue
        phases, total = row["profile"]["phases"], sum(row["profile"]["phases"].values()) or 1.0
        ops = "; ".join(f"{op['op']} {100 * op['share']:.0f} % ({op['calls']}x "
                        f"{' '.join('x'.join(map(str, shape)) for shape in op['shapes'][:2])})"
                        for op in row["profile"]["ops"])
        table.append([row["method"], str(row["dims"]),
                      *[f"{100 * phases.get(phase, 0.0) / total:.0f}" for phase in PHASES], ops])
    return "\n".join(markdown_table(header, table))


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(MODULE, __doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 3], choices=(2, 3))
    parser.add_argument("--steps", type=int, default=3, help="timed rounds per case (after one warm-up); the fastest counts")
    parser.add_argument("--batch", type=int, default=None, help="override train.batch_size")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step per case (where the time goes)")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "DIMS", "DATA"), help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)  # config overrides (--one)
    args = parser.parse_args(argv)
    if args.one:  # a child process: one case, JSON on stdout
        method, dims, data = args.one
        print(json.dumps(measure(method, int(dims), Path(data), torch.device(args.device), args.steps, args.batch,
                                 args.set, args.profile)))
        return
    rows = measure_all(args.dims, args.device, args.steps, args.batch, profile=args.profile)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}\n")
    print(format_rows(rows))
    if args.profile:
        print("\n" + format_profile(rows))


if __name__ == "__main__":
    main()
