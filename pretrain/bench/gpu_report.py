"""Turn what tools/gpu_check.sh brought back (one folder per call: summary.txt, the logs and
results.tar.gz) into the record committed under benchmarks/: `<out>/<device>/<commit>/` with the
raw JSON, tables and logs, and a README.md holding the device, date and commit, each stage's exit
status and time, the numbers issues 16 and 21 ask for against their floors, the kernel rows and
the training tables (tools/gpu_report.py is the command)."""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from kernels.devices import sku_for
from pretrain.files import atomic_directory

LOGS = ("summary.txt", "bench.log", "trainbench.log", "profile.log", "tests.log")
STAGE_LINE = re.compile(r"^(\w+): (exit \d+ after \d+ s \(limit \d+ s\)|skipped: .*) \(\d\d:\d\d:\d\d\)$")
NOT_RUN_LINE = re.compile(r"^not run: (.*) \(\d\d:\d\d:\d\d\)$")


@dataclass
class Call:
    """One gpu_check call's folder, as its summary.txt describes it."""

    folder: Path
    device: str = "unknown"
    gpu_line: str = ""  # nvidia-smi's name, memory, driver and clocks
    software: str = ""
    commit: str = "unknown"
    commit_named: bool = False  # COMMIT was given (else the device copy's .git, maybe stale)
    date: str = ""
    stages: list[tuple[str, str]] = field(default_factory=list)  # (stage, what happened)


def read_call(folder: Path) -> Call:
    summary = folder / "summary.txt"
    if not summary.is_file():
        raise ValueError(f"{folder}: no summary.txt; give the folder a gpu_check call's files came back to")
    call = Call(folder)
    lines = summary.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("name, memory.total") and i + 1 < len(lines):
            call.gpu_line = lines[i + 1].strip()
            call.device = call.gpu_line.split(",")[0].strip()
        elif line.startswith("torch "):
            call.software = line.strip()
        elif line.startswith("commit: "):
            value = line.removeprefix("commit: ").strip()
            call.commit_named = "(" not in value
            call.commit = value.split()[0] if value else "unknown"
        elif re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", line.strip()):
            call.date = line.strip()
        elif found := STAGE_LINE.match(line.strip()):
            call.stages.append((found.group(1), found.group(2)))
        elif found := NOT_RUN_LINE.match(line.strip()):
            call.stages.append(("not run", found.group(1)))
    return call


def device_folder(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-sxm' (the SKU, kernels.devices), else the name in lower case."""
    sku = sku_for(device)
    name = sku if sku is not None else device.removeprefix("NVIDIA ").strip()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def unpack_results(archive: Path, into: Path) -> list[str]:
    """The plain files of results.tar.gz (packed flat by gpu_check), written into `into`; any
    other member (a folder path, a link, '..') is refused: the archive came from another machine."""
    names = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name.removeprefix("./")
            if member.isdir() and name in ("", "."):
                continue
            if not member.isfile() or not name or "/" in name or name.startswith("."):
                raise ValueError(f"{archive}: member {member.name!r} is not a plain file at the top; refusing it")
            (into / name).write_bytes(tar.extractfile(member).read())
            names.append(name)
    return names


def write_report(call_folders: list[Path], out_root: Path) -> Path:
    """Write `<out_root>/<device>/<commit>/` from the calls' folders (in the order they ran: a later
    call's file of the same name replaces an earlier one's; logs are joined) and return it. The
    calls must share one device and one commit; an existing record is not overwritten."""
    calls = [read_call(Path(f)) for f in call_folders]
    if not calls:
        raise ValueError("give at least one call's folder")
    for what in ("device", "commit"):
        seen = {getattr(c, what) for c in calls}
        if len(seen) > 1:
            raise ValueError(f"the calls ran on different {what}s ({', '.join(sorted(seen))}): report each on its own")
    first = calls[0]
    dest = Path(out_root) / device_folder(first.device) / first.commit
    if dest.exists():
        raise ValueError(f"{dest} exists already: remove it, or pass another --out")
    with atomic_directory(dest) as tmp:
        origin = {}
        for i, call in enumerate(calls, 1):
            archive = call.folder / "results.tar.gz"
            found = unpack_results(archive, tmp) if archive.is_file() else []
            for loose in sorted(call.folder.glob("*.json")) + sorted(call.folder.glob("*.md")):
                if loose.name != "README.md":  # a folder already unpacked (an older record)
                    (tmp / loose.name).write_bytes(loose.read_bytes())
                    found.append(loose.name)
            origin.update({name: i for name in found})
            for log in LOGS:
                if (call.folder / log).is_file():
                    text = (call.folder / log).read_text(errors="replace")
                    header = f"==> call {i} of {len(calls)} <==\n" if len(calls) > 1 else ""
                    with open(tmp / log, "a") as f:
                        f.write(header + text + ("" if text.endswith("\n") else "\n"))
        results = {}
        for name in origin:
            if name.endswith(".json"):
                try:
                    results[name] = json.loads((tmp / name).read_text())
                except json.JSONDecodeError as err:  # a stage killed mid-write cannot leave one (atomic writes)
                    results[name] = {"unreadable": str(err)}
        (tmp / "README.md").write_text(render(calls, results, origin, tmp))
    return dest


# ----------------------------------------------------------------------------- the README
def _rows(payload: dict | None, section: str) -> dict:
    """{(name, v_dim): row} of a bench_kernels JSON section ('results' or 'layer')."""
    return {(r["name"], r.get("v_dim")): r for r in (payload or {}).get(section, [])}


def _find(rows: dict, name: str, v_dim=None) -> dict | None:
    for (n, d), r in rows.items():
        if n == name and (v_dim is None or d == v_dim):
            return r
    return None


def _check(value, floor: str, met: bool | None) -> list[str]:
    return [value, floor, "n/a" if met is None else ("yes" if met else "**no**")]


def issue21_lines(results: dict) -> list[list[str]]:
    """The kernel numbers of issue 21 against its floors (from bench, skew and layer)."""
    bench, skew = _rows(results.get("bench_kernels.json"), "results"), _rows(results.get("bench_skew.json"), "results")
    layer = _rows(results.get("bench_layer.json"), "layer")
    out = []
    fb, fb_torch = _find(bench, "scoring_fwd_bwd_triton"), _find(bench, "scoring_fwd_bwd_torch")
    if fb and fb_torch:
        ratio = fb_torch["p50"] / fb["p50"]
        out.append(
            [
                "scoring fwd+bwd, PyTorch / Triton",
                *_check(f"{ratio:.2f}x ({fb_torch['p50']:.3f} / {fb['p50']:.3f} ms)", ">= 3x", ratio >= 3),
            ]
        )
    for (name, d), r in sorted(bench.items(), key=lambda item: item[0][1] or 0):
        if name == "bag_fwd_triton" and r.get("pct_peak") is not None:
            spread = r["p80"] / r["p20"]
            met = r["pct_peak"] >= 90 and spread <= 1.15
            out.append(
                [
                    f"bag fwd d={d}, % of peak bandwidth",
                    *_check(f"{r['pct_peak']:.1f}% (p80/p20 {spread:.3f})", ">= 90%, p80/p20 <= 1.15", met),
                ]
            )
    for name, label in (("bag_bwd_triton_sorted", "bag bwd sorted"), ("scoring_bwd_triton", "scoring bwd Triton")):
        uniform = _find(bench, name, 1024)
        hot = _find(skew, name, 1024)
        if uniform and hot:
            ratio = hot["p50"] / uniform["p50"]
            floor, met = ("<= 1.3x", ratio <= 1.3) if name.startswith("bag") else ("(no floor)", None)
            out.append(
                [
                    f"{label}, Zipf(1.0) / uniform, d=1024",
                    *_check(f"{ratio:.2f}x ({hot['p50']:.3f} / {uniform['p50']:.3f} ms)", floor, met),
                ]
            )
    lt, lp = _find(layer, "memory_layer_fwd_bwd_triton"), _find(layer, "memory_layer_fwd_bwd_torch")
    if lt and lp:
        ratio = lp["p50"] / lt["p50"]
        out.append(
            [
                "whole memory layer fwd+bwd, PyTorch / Triton",
                *_check(f"{ratio:.2f}x ({lp['p50']:.3f} / {lt['p50']:.3f} ms)", ">= 3x", ratio >= 3),
            ]
        )
    return out


def issue16_lines(results: dict) -> list[list[str]]:
    """The training numbers of issue 16 against its floors (bench_train's 373M and 1.3B JSONs)."""
    out = []
    t373 = results.get("bench_train_373m.json") or {}
    rows = [r for r in t373.get("rows", []) if "error" not in r]
    for r in rows:
        if r["model"] != "memory" or not r["compile"] or r["ac"] != "none" or r.get("mfu") is None:
            continue
        # the issue counts MFU on the dense-equivalent FLOPs (the dense twin's FLOPs per token at
        # this variant's speed); without the twin's row, the model's own counted FLOPs
        equiv = r.get("mfu_dense_equiv")
        mfu = equiv if equiv is not None else r["mfu"]
        value = f"{100 * mfu:.1f}% ({'dense-equivalent; ' if equiv is not None else ''}counted: {100 * r['mfu']:.1f}%)"
        out.append([f"373M {r['variant']}: MFU", *_check(value, ">= 40%", mfu >= 0.40)])
    for q in t373.get("ratios", []):
        if q["ratio"].startswith("memory/dense step time (compiled"):
            out.append([f"373M {q['ratio']}", *_check(f"{q['value']:.3f}", "<= 1.25", q["value"] <= 1.25)])
    t13 = results.get("bench_train_1p3b.json") or {}
    for r in t13.get("rows", []):
        what = f"1.3B {r['variant']}: peak memory"
        if "error" in r:
            out.append([what, *_check(f"failed: {r['error'][:120]}", "trains", False)])
        else:
            out.append([what, *_check(f"{_peak_memory(r)}, {r['median_step_s'] * 1e3:.1f} ms/step", "recorded", None)])
    return out


def _peak_memory(r: dict) -> str:
    """The measured peak, and beside it memlayers-model-info's prediction where the row carries one
    (bench_train's estimated_memory_bytes: docs/training.md, "Memory per GPU")."""
    text = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"
    estimate = r.get("estimated_memory_bytes")
    if estimate:
        text += f" (estimate {estimate / 2**30:.2f} GiB, measured / estimate {r['peak_memory_bytes'] / estimate:.2f})"
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _fmt(r: dict, key: str, fmt: str) -> str:
    return format(r[key], fmt) if r.get(key) is not None else ""


def kernel_table(payload: dict) -> list[str]:
    rows = [
        [r["name"], str(r.get("v_dim", "")), _fmt(r, "p20", ".3f"), _fmt(r, "p50", ".3f"), _fmt(r, "p80", ".3f"),
         _fmt(r, "gb_s", ".0f"), _fmt(r, "pct_peak", ".1f"), _fmt(r, "tflop_s", ".1f"), _fmt(r, "speedup", ".2f")]
        for r in payload.get("results", [])
    ]  # fmt: skip
    return _table(["kernel", "d", "p20 ms", "p50 ms", "p80 ms", "GB/s", "% peak", "TFLOP/s", "speed-up"], rows)


def layer_table(payload: dict) -> list[str]:
    rows = [
        [r["name"], _fmt(r, "p50", ".3f"), _fmt(r, "speedup", ".2f"), _fmt(r, "share", ".3f") or _fmt(r, "share_of_layer", ".3f"),
         _fmt(r, "total_ms", ".2f"), _fmt(r, "tflop_s", ".1f")]
        for r in payload.get("layer", [])
    ]  # fmt: skip
    return _table(["row", "p50 ms", "speed-up", "share", "total ms", "TFLOP/s"], rows)


def render(calls: list[Call], results: dict, origin: dict, folder: Path) -> str:
    first = calls[0]
    commit_note = (
        "" if all(c.commit_named for c in calls) else " (not named by COMMIT: the device copy's .git, maybe stale)"
    )
    lines = [
        f"# {first.device}: gpu_check at {first.commit}",
        "",
        f"- **Device**: {first.gpu_line or first.device} (nvidia-smi: name, memory, driver, max SM / memory clocks)",
        f"- **Software**: {first.software or 'unknown'}",
        f"- **Commit**: {first.commit}{commit_note}",
        f"- **Date**: {', '.join(c.date or '?' for c in calls)} (UTC, start of each call)",
        "",
        "## Stages",
        "",
    ]
    stage_rows = []
    for i, call in enumerate(calls, 1):
        stage_rows += [[str(i), name, what] for name, what in call.stages]
    lines += _table(["call", "stage", "result"], stage_rows)
    incomplete = sorted(n for n, p in results.items() if isinstance(p, dict) and p.get("complete") is False)
    if incomplete:
        lines += [
            "",
            f"Cut short (their stage stopped at its limit; the rows measured are kept): {', '.join(incomplete)}.",
        ]
    for title, found in (("Issue 21: kernels", issue21_lines(results)), ("Issue 16: training", issue16_lines(results))):
        lines += ["", f"## {title} against the floors", ""]
        lines += _table(["measure", "value", "floor", "met"], found) if found else ["Not measured in these calls."]
    sections = (
        ("bench_kernels.json", "Kernels at the paper's shapes (bench)", kernel_table),
        ("bench_skew.json", "Zipf(1.0) slots (skew)", kernel_table),
        ("bench_layer.json", "Memory layer, model and sublayer kinds (layer)", layer_table),
    )
    for name, title, make in sections:
        if name in results:
            lines += [
                "",
                f"## {title}",
                "",
                f"`{name}`, p50 of the per-call times (speed-up: over the PyTorch row)",
                "",
            ]
            lines += make(results[name])
    for name, title in (
        ("bench_train_373m.md", "373M training (train373)"),
        ("bench_train_1p3b.md", "1.3B training (train1p3b)"),
    ):
        if (folder / name).is_file():
            lines += ["", f"## {title}", "", (folder / name).read_text().strip()]
    pins = (results.get("launch_configs.json") or {}).get("pins")
    if pins:
        lines += ["", "## Launch configurations: steady winners (configs)", ""]
        lines += _table(
            ["kernel", "tuning key", "winner"],
            [[k, key, json.dumps(c)] for k, by in pins.items() for key, c in by.items()],
        )
    lines += ["", "## Files", ""]
    lines += [f"- `{name}` (call {i})" for name, i in sorted(origin.items())]
    lines += [f"- `{log}`" for log in LOGS if (folder / log).is_file()]
    return "\n".join(lines) + "\n"
