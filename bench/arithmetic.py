"""Task-vector arithmetic + IBVS + save on synthetic checkpoints: throughput and peak memory.

For each size (GB, decimal) and dtype it writes Llama-shaped synthetic checkpoints to ``--workdir``
(base, suspect = base + noise, BV = a delta file), then measures, each in a fresh subprocess:

* ``mergeshield``: the issue's job. τ = suspect − base, τ' = τ − λ·BV, write base + τ'
  (reads 3 files, writes 1) with ``TaskVector`` and ``save_checkpoint`` (the streamed engine of
  ``checkpoint_writer.py``).
* ``sanitise``: ``ibvs.sanitise(suspect, BV, λ)`` (reads 2, writes 1): the same output.
* ``mergekit``: ``mergekit-yaml`` task_arithmetic of base + the suspect at weight 1 (reads 2,
  writes 1), from a separate venv (``--mergekit-venv``).
* ``copy``: a plain read/write copy of the suspect's bytes (reads 1, writes 1), the floor.

Every wall time includes a ``sync`` after the process exits (MergeShield fsyncs, mergekit does
not), so all tools pay for getting their bytes to disk. Peak memory: ``ru_maxrss`` of the child
(``wait4``) and the peaks of RssAnon / RssFile sampled from ``/proc/PID/status`` every 20 ms
(RssFile counts the memory-mapped input pages; they are reclaimable page cache, RssAnon is not).

The CLIP ViT-B/32 scan this bench used to run is ``bench/scan_clip.py`` now.

Writes ``docs/benchmarks/arithmetic.md`` and ``.json``. Smoke run: ``--sizes 0.05``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LAMBDA = 0.75
VOCAB = 32000
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


# -- synthetic checkpoints ------------------------------------------------------------------------
def llama_shapes(size_gb: float, elsize: int) -> tuple[dict[str, Any], list[tuple[str, tuple]]]:
    """A Llama-like config and tensor list whose bytes come to about ``size_gb`` GB."""
    d = 512 if size_gb <= 0.2 else 1024 if size_gb <= 1 else 2048 if size_gb <= 4 else 4096
    inter = int(d * 2.6875) // 64 * 64  # Llama-7B's ratio: 11008 / 4096
    fixed = 2 * VOCAB * d + d
    layer = 4 * d * d + 3 * d * inter + 2 * d
    n_layers = max(1, round((size_gb * 1e9 / elsize - fixed) / layer))
    shapes: list[tuple[str, tuple]] = [("model.embed_tokens.weight", (VOCAB, d))]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (d,))]
        shapes += [(p + f"self_attn.{x}_proj.weight", (d, d)) for x in "qkvo"]
        shapes += [(p + "post_attention_layernorm.weight", (d,)),
                   (p + "mlp.gate_proj.weight", (inter, d)), (p + "mlp.up_proj.weight", (inter, d)),
                   (p + "mlp.down_proj.weight", (d, inter))]
    shapes += [("model.norm.weight", (d,)), ("lm_head.weight", (VOCAB, d))]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d,
        "intermediate_size": inter, "num_hidden_layers": n_layers,
        "num_attention_heads": d // 128, "num_key_value_heads": d // 128,
        "vocab_size": VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    }
    return config, shapes


def job_make(workdir: Path, size_gb: float, dtype_name: str) -> dict[str, Any]:
    """Write base/, suspect/ and bv/ (one tensor in memory at a time)."""
    import torch

    from mergeshield.checkpoints import TensorInfo, save_checkpoint

    dtype = getattr(torch, DTYPES[dtype_name])
    elsize = torch.empty((), dtype=dtype).element_size()
    config, shapes = llama_shapes(size_gb, elsize)
    config["torch_dtype"] = DTYPES[dtype_name]
    biggest = max(int(torch.Size(s).numel()) for _, s in shapes)
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(biggest + 4096, generator=gen)  # reused with offsets: cheap, not constant
    specs = {n: TensorInfo(dtype, s, int(torch.Size(s).numel()) * elsize) for n, s in shapes}

    def tensors(kind: str):  # base: 0.02·pool, suspect: base + 1e-3·shifted pool, bv: 1e-3·pool
        for i, (name, shape) in enumerate(shapes):
            n = int(torch.Size(shape).numel())
            base = pool[i % 1024: i % 1024 + n] * 0.02
            if kind == "suspect":
                base += 1e-3 * pool[(i + 7) % 2048: (i + 7) % 2048 + n]
            elif kind == "bv":
                base = 1e-3 * pool[(i + 13) % 4096: (i + 13) % 4096 + n]
            yield name, base.view(shape).to(dtype)

    t0 = time.perf_counter()
    for kind in ("base", "suspect", "bv"):
        save_checkpoint(workdir / kind, tensors(kind), specs=specs, config=config)
    n_params = sum(int(torch.Size(s).numel()) for _, s in shapes)
    return {"seconds": time.perf_counter() - t0, "n_params": n_params, "n_tensors": len(shapes),
            "n_layers": config["num_hidden_layers"], "hidden": config["hidden_size"],
            "largest_tensor_bytes": biggest * elsize, "bytes": folder_bytes(workdir / "base")}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# -- the measured jobs ----------------------------------------------------------------------------
def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            out[key] = int(val.split()[0]) // 1024  # MiB
    return out


def job_mergeshield(workdir: Path, out: Path, mode: str) -> dict[str, Any]:
    t_import = time.perf_counter()
    from mergeshield import checkpoints
    from mergeshield.ibvs import sanitise
    from mergeshield.task_vectors import TaskVector

    stages: dict[str, float] = {"import": time.perf_counter() - t_import}  # torch, transformers
    t0 = time.perf_counter()
    srcs = {k: checkpoints.resolve(str(workdir / k)) for k in ("base", "suspect", "bv")}
    stages["resolve"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    with checkpoints.open_checkpoint(srcs["base"]) as base, \
            checkpoints.open_checkpoint(srcs["suspect"]) as suspect, \
            checkpoints.open_checkpoint(srcs["bv"]) as bv_ck:
        keys = list(suspect)
        checkpoints.check_compatible(base, suspect)
        checkpoints.check_compatible(suspect, bv_ck)
        bv = TaskVector.stored(bv_ck)  # a BV file, as bv_cache and `merge --subtract` read it
        if mode == "mergeshield":  # τ' = (suspect − base) − λ·BV, written as base + τ'
            tau = TaskVector.between(base, suspect, keys)
            cleaned = (tau - LAMBDA * bv).apply_lazily(base, 1.0)
        else:  # θ' = suspect − λ·BV
            cleaned = sanitise(suspect, bv, LAMBDA)
        stages["open"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        checkpoints.save_checkpoint(out, cleaned, specs={k: suspect.info(k) for k in suspect},
                                    config=srcs["suspect"].config,
                                    metadata={"mergeshield.ibvs_lambda": repr(LAMBDA)})
        stages["compute_and_write"] = time.perf_counter() - t2
    return {"stages": stages, "self": _status()}


def job_copy(workdir: Path, out: Path) -> dict[str, Any]:
    """The floor: the suspect's files read and written in 64 MiB chunks, then fsynced."""
    out.mkdir(parents=True, exist_ok=True)
    buf = bytearray(64 * 2**20)
    view = memoryview(buf)
    for src in sorted((workdir / "suspect").iterdir()):
        with open(src, "rb") as f, open(out / src.name, "wb") as g:
            while n := f.readinto(buf):
                g.write(view[:n])
            g.flush()
            os.fsync(g.fileno())
    return {"self": _status()}


# -- the harness ----------------------------------------------------------------------------------
def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _busy_cpu_s() -> float:
    """CPU seconds all processes have spent busy since boot (/proc/stat, USER_HZ = 100)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / os.sysconf("SC_CLK_TCK")


def measure(cmd: list[str], *, cold: bool, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; wall time (process + the sync after it), peaks, I/O counters, its JSON."""
    dropped = drop_caches() if cold else (os.sync() or False)
    load_start = os.getloadavg()
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    io: dict[str, int] = {}
    busy0 = _busy_cpu_s()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=ROOT)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    key, _, val = line.partition(":")
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(val.split()[0]))
                for line in Path(f"/proc/{proc.pid}/io").read_text().splitlines():
                    key, _, val = line.partition(":")
                    io[key] = int(val)
            except (OSError, ValueError):
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout_chunks: list[bytes] = []
    stderr_chunks: list[bytes] = []
    readers = [threading.Thread(target=lambda s=s, b=b: b.append(s.read()), daemon=True)
               for s, b in ((proc.stdout, stdout_chunks), (proc.stderr, stderr_chunks))]
    for r in readers:
        r.start()
    _, status, rusage = os.wait4(proc.pid, 0)
    t_exit = time.perf_counter()
    done.set()
    for r in readers:
        r.join()
    os.sync()
    t_sync = time.perf_counter()
    other = _busy_cpu_s() - busy0 - rusage.ru_utime - rusage.ru_stime
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = b"".join(stdout_chunks).decode(errors="replace")
    stderr = b"".join(stderr_chunks).decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}):\n{stderr[-3000:]}")
    last = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    return {
        "wall_s": t_sync - t0, "process_s": t_exit - t0, "sync_s": t_sync - t_exit,
        "user_s": rusage.ru_utime, "sys_s": rusage.ru_stime,
        "peak_rss_mib": rusage.ru_maxrss / 1024,
        "peak_rss_anon_mib": peaks["RssAnon"] / 1024, "peak_rss_file_mib": peaks["RssFile"] / 1024,
        "disk_read_bytes": io.get("read_bytes"), "disk_write_bytes": io.get("write_bytes"),
        "rchar": io.get("rchar"), "wchar": io.get("wchar"),
        "caches_dropped": dropped, "other_cpu_s": max(0.0, other),
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "job": json.loads(last[-1]) if last else None,
    }


def mergekit_version(args: argparse.Namespace) -> str | None:
    """mergekit's version in ``--mergekit-venv``, created first with ``--setup-mergekit``; None
    (and a line saying so: its rows are skipped) when it is not there."""
    venv = args.mergekit_venv
    if args.setup_mergekit and not (venv / "bin" / "mergekit-yaml").exists():
        print(f"creating {venv} with mergekit (pip, from the package index)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        # torch first, at this environment's version: a bare `pip install mergekit` pulls a
        # multi-GB CUDA torch, where this pin finds the CPU build the local index has
        torch_pin = "torch==" + importlib.metadata.version("torch").split("+")[0]
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", torch_pin], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "mergekit"], check=True)
    if not (venv / "bin" / "python").exists():
        print(f"mergekit: no venv at {venv}; its rows are skipped (--setup-mergekit creates "
              "it)", flush=True)
        return None
    mk = subprocess.run([str(venv / "bin" / "python"), "-c",
                         "import importlib.metadata as m; print(m.version('mergekit'))"],
                        capture_output=True, text=True)
    return mk.stdout.strip() or None


def mergekit_cmd(venv: Path, workdir: Path, out: Path, dtype_name: str) -> list[str]:
    yml = workdir / "mergekit.yml"
    yml.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {workdir / 'base'}\n"
        "models:\n"
        f"  - model: {workdir / 'suspect'}\n"
        "    parameters:\n      weight: 1.0\n"
        f"dtype: {DTYPES[dtype_name]}\n")
    return [str(venv / "bin" / "mergekit-yaml"), str(yml), str(out), "--lazy-unpickle",
            "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]


def machine() -> dict[str, Any]:
    import torch

    mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    disk = shutil.disk_usage("/tmp")
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(int(mem) / 2**20, 1),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(),
            "tmp_free_gb": round(disk.free / 1e9, 1),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}


def run_size(args: argparse.Namespace, size: float, dtype_name: str) -> list[dict[str, Any]]:
    work = args.workdir / f"{size}-{dtype_name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    py = sys.executable
    me = str(Path(__file__).resolve())
    rows: list[dict[str, Any]] = []
    try:
        print(f"[{size} GB {dtype_name}] writing synthetic base/suspect/bv ...", flush=True)
        made = measure([py, me, "--job", "make", str(work), str(size), dtype_name], cold=False)
        info = made["job"]
        nbytes = info["bytes"]
        print(f"  {nbytes / 1e9:.2f} GB per file, {info['n_tensors']} tensors, largest "
              f"{info['largest_tensor_bytes'] / 2**20:.0f} MiB, made in {made['wall_s']:.0f}s",
              flush=True)
        plans = {
            "copy": ([py, me, "--job", "copy", str(work), str(work / "out")], 1),
            "mergeshield": ([py, me, "--job", "mergeshield", str(work), str(work / "out")], 3),
            "sanitise": ([py, me, "--job", "sanitise", str(work), str(work / "out")], 2),
            "mergekit": (mergekit_cmd(args.mergekit_venv, work, work / "out", dtype_name), 2),
        }
        for tool in args.tools:
            if tool == "mergekit" and not (args.mergekit_venv / "bin" / "mergekit-yaml").exists():
                print("  mergekit: not installed, skipped", flush=True)
                continue
            cmd, n_in = plans[tool]
            shutil.rmtree(work / "out", ignore_errors=True)
            for rep in range(args.repeats):
                try:
                    r = measure(cmd, cold=args.cold)
                except RuntimeError as exc:
                    print(f"  {tool}: FAILED {str(exc)[:2000]}", flush=True)
                    rows.append({"size_gb": size, "dtype": dtype_name, "tool": tool,
                                 "error": str(exc)[-2000:]})
                    break
                written = folder_bytes(work / "out")
                r.update({"size_gb": size, "dtype": dtype_name, "tool": tool, "repeat": rep,
                          "bytes_read": n_in * nbytes, "bytes_written": written,
                          "checkpoint_bytes": nbytes, "synthetic": info})
                r["gbps_written"] = written / r["wall_s"] / 1e9
                r["gbps_read_written"] = (n_in * nbytes + written) / r["wall_s"] / 1e9
                rows.append(r)
                print(f"  {tool:11s} {r['wall_s']:7.1f}s (sync {r['sync_s']:.1f}s)  "
                      f"{r['gbps_written']:.2f} GB/s out  {r['gbps_read_written']:.2f} GB/s r+w  "
                      f"peak RSS {r['peak_rss_mib']:.0f} MiB (anon {r['peak_rss_anon_mib']:.0f}, "
                      f"file {r['peak_rss_file_mib']:.0f}); "
                      f"others used {r['other_cpu_s']:.0f} CPU-s",
                      flush=True)
                shutil.rmtree(work / "out", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


# -- report ---------------------------------------------------------------------------------------
def write_docs(out_dir: Path, result: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "arithmetic.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        "# Task-vector arithmetic + IBVS + save: throughput and peak memory",
        "",
        f"Written by `bench/arithmetic.py` on {m['date']}: {m['nproc']} CPUs ({m['cpu']}), "
        f"{m['ram_gib']} GiB RAM, torch {m['torch']} ({m['torch_threads']} threads), "
        f"Python {m['python']}, no GPU. Command: `{result['command']}`.",
        "",
        "Synthetic Llama-shaped checkpoints (vocab 32000; `[d,d]` attention and `[2.69d,d]` MLP "
        "tensors; d = 1024 / 2048 / 4096 for 0.5 / 2 / 8 GB). Jobs: **mergeshield** = "
        "τ = suspect − base, τ' = τ − λ·BV, write base + τ' (reads base, suspect, BV: 3 files); "
        "**sanitise** = `ibvs.sanitise(suspect, BV, λ)` (reads 2); **mergekit** = "
        "`mergekit-yaml` task_arithmetic of base + suspect at weight 1 "
        f"(mergekit {result.get('mergekit_version')}, `--lazy-unpickle`, reads 2); **copy** = "
        "the suspect's bytes read and written in 64 MiB chunks + fsync (reads 1), the floor.",
        "",
        "Wall time includes a `sync` after the process exits, so tools that do not fsync pay "
        "for their dirty pages too. GB/s out = bytes written / wall; GB/s r+w = (bytes read + "
        "bytes written) / wall (logical checkpoint bytes, decimal GB). Peak RSS = `ru_maxrss`; "
        "anon / file = sampled peaks of RssAnon / RssFile (file pages are memory-mapped inputs, "
        f"reclaimable). Page caches dropped before each run: {result['caches_dropped']}.",
        "",
        "Load = the machine's 1/5/15-minute load averages when the run started (2 CPUs: above "
        "2 means other processes competed for them).",
        "",
        "| size GB | dtype | tool | wall s | GB/s out | GB/s r+w | peak RSS MiB | anon MiB "
        "| file MiB | read GB | written GB | × copy | × mergekit | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    floor = {(r["size_gb"], r["dtype"]): r["wall_s"] for r in result["runs"]
             if r["tool"] == "copy" and "wall_s" in r}
    mergekit = {(r["size_gb"], r["dtype"]): r["wall_s"] for r in result["runs"]
                if r["tool"] == "mergekit" and "wall_s" in r}
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['size_gb']} | {r['dtype']} | {r['tool']} | failed: "
                         f"{r['error'].splitlines()[-1][:120]} |||||||||||")
            continue
        ref = floor.get((r["size_gb"], r["dtype"]))
        mk = mergekit.get((r["size_gb"], r["dtype"]))
        load = r.get("loadavg_start")
        lines.append(
            f"| {r['size_gb']} | {r['dtype']} | {r['tool']} | {r['wall_s']:.1f} | "
            f"{r['gbps_written']:.2f} | {r['gbps_read_written']:.2f} | {r['peak_rss_mib']:.0f} | "
            f"{r['peak_rss_anon_mib']:.0f} | {r['peak_rss_file_mib']:.0f} | "
            f"{r['bytes_read'] / 1e9:.2f} | {r['bytes_written'] / 1e9:.2f} | "
            + (f"{r['wall_s'] / ref:.2f} |" if ref else "– |")
            + (f" {r['wall_s'] / mk:.2f} |" if mk else " – |")
            + (f" {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} |" if load else " – |"))
    staged = [r for r in result["runs"] if (r.get("job") or {}).get("stages")]
    if staged:
        lines += ["", "Where the MergeShield rows' time goes (seconds inside the process; the rest "
                      "of the wall time is starting Python, exiting and the final `sync`):", "",
                  "| size GB | dtype | tool | " + " | ".join(staged[0]["job"]["stages"]) + " |",
                  "|---|---|---|" + "---|" * len(staged[0]["job"]["stages"])]
        for r in staged:
            st = r["job"]["stages"]
            lines.append(f"| {r['size_gb']} | {r['dtype']} | {r['tool']} | "
                         + " | ".join(f"{st.get(k, 0):.2f}" for k in staged[0]["job"]["stages"])
                         + " |")
    sizes = {}
    for r in result["runs"]:
        if "synthetic" in r:
            sizes[(r["size_gb"], r["dtype"])] = r["synthetic"]
    if sizes:
        lines += ["", "| size GB | dtype | tensors | layers | d | largest tensor MiB | "
                      "bytes per file | generated in s |", "|---|---|---|---|---|---|---|---|"]
        for (s, d), i in sizes.items():
            lines.append(f"| {s} | {d} | {i['n_tensors']} | {i['n_layers']} | {i['hidden']} | "
                         f"{i['largest_tensor_bytes'] / 2**20:.0f} | {i['bytes']} | "
                         f"{i['seconds']:.0f} |")
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    (out_dir / "arithmetic.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="0.5,2,8", help="checkpoint sizes in GB, e.g. 0.05")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--tools", default="copy,mergeshield,sanitise,mergekit")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/msbench"))
    p.add_argument("--mergekit-venv", type=Path, default=Path("/tmp/mergekit-venv"))
    p.add_argument("--setup-mergekit", action="store_true",
                   help="create --mergekit-venv with mergekit from the package index if absent")
    p.add_argument("--warm", dest="cold", action="store_false",
                   help="do not drop the page cache before each run")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    p.add_argument("--note", action="append", default=[])
    p.add_argument("--append", action="store_true",
                   help="add these runs to an existing arithmetic.json instead of replacing it")
    p.add_argument("--job", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.job:
        name, *rest = args.job
        sys.path.insert(0, str(ROOT))
        if name == "make":
            res = job_make(Path(rest[0]), float(rest[1]), rest[2])
        elif name in ("mergeshield", "sanitise"):
            res = job_mergeshield(Path(rest[0]), Path(rest[1]), name)
        elif name == "copy":
            res = job_copy(Path(rest[0]), Path(rest[1]))
        else:
            raise SystemExit(f"unknown job {name}")
        print(json.dumps(res))
        return
    args.tools = args.tools.split(",")
    args.workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "command": "python bench/arithmetic.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(), "lambda": LAMBDA, "caches_dropped": None,
        "mergekit_version": mergekit_version(args) if "mergekit" in args.tools else None,
        "runs": [], "notes": args.note,
    }
    if args.append and (args.out / "arithmetic.json").exists():
        old = json.loads((args.out / "arithmetic.json").read_text())
        result["runs"] = old["runs"]
        result["notes"] = old.get("notes", []) + args.note
        result["command"] = old["command"] + " ; " + result["command"]
    for size in (float(s) for s in args.sizes.split(",")):
        for dtype_name in args.dtypes.split(","):
            need = 5 * llama_bytes(size, dtype_name)
            free = shutil.disk_usage(args.workdir).free
            if need > free:
                print(f"[{size} GB {dtype_name}] skipped: needs {need / 1e9:.0f} GB, "
                      f"{free / 1e9:.0f} GB free", flush=True)
                result["notes"].append(f"{size} GB {dtype_name} skipped: not enough disk")
                continue
            result["runs"] += run_size(args, size, dtype_name)
            dropped = [r.get("caches_dropped") for r in result["runs"] if "caches_dropped" in r]
            result["caches_dropped"] = all(dropped) if dropped else None
            write_docs(args.out, result)  # partial results survive a long run being cut
    write_docs(args.out, result)
    print(f"wrote {args.out / 'arithmetic.md'} and arithmetic.json", flush=True)


def llama_bytes(size: float, dtype_name: str) -> int:
    elsize = 4 if dtype_name == "fp32" else 2
    _, shapes = llama_shapes(size, elsize)
    total = 0
    for _, s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n * elsize
    return total


if __name__ == "__main__":
    main()
