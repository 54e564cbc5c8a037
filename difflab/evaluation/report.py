"""An evaluation's result as JSON (the numbers only, no timings: one seed gives equal files) and as a table."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..data.pairs import ATTRIBUTES
from ..io import atomic_path


def _finite(x):
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def to_json(result: dict) -> str:
    """The numbers (everything but the timings) as JSON text."""
    return json.dumps(_finite({k: v for k, v in result.items() if k != "seconds"}), indent=2) + "\n"


def write_json(result: dict, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(to_json(result))


def _format_text(t: dict) -> list[str]:
    lines = [f"prompts: {t['prompts']}"]
    f = t.get("follows")
    if f is None:
        lines.append(f"follows the caption: - ({t['reason']})")
    else:
        rows = [
            ("all prompts", f["all"]),
            ("seen combinations", f["seen"]),
            ("held-out combinations", f["held_out"]),
            ("caption-shuffled", f["shuffled"]),
            ("caption swap", t.get("caption_swap")),
        ]
        labelled = [(f"{name} (n={acc['n']})", acc) for name, acc in rows if acc is not None]
        width = max(22, *(len(label) for label, _ in labelled))  # the columns line up whatever the counts
        heads = (*ATTRIBUTES, "all four", "either side")
        lines.append(f"  {'attribute accuracy':{width}}" + "".join(f"{a:>14}" for a in heads))
        for label, acc in labelled:
            values = [*acc["per_attribute"].values(), acc["all_four"], acc["either_side"]]
            lines.append(f"  {label:{width}}" + "".join(f"{100 * v:13.1f}%" for v in values))
        by = f.get("by_phrasing") or {}
        if len(by) > 1:  # which wording the model reads worst
            lines.append("  all four by phrasing, seen combinations:")
            lines += [f"    {100 * v['all_four']:5.1f}% (n={v['n']})  {p}" for p, v in by.items()]
    c = t.get("clip_score")
    if c:
        real = f", real test images {c['real']:.3f}" if c["real"] is not None else ""
        lines.append(f"CLIP-score (cosine, {c['run']}): samples {c['samples']:.3f}{real}")
    return lines


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_report(result: dict) -> str:
    """A readable table of an evaluate() result."""
    r = result
    lines = [
        f"{r['run']}: {r['dataset']}, step {r['step']}, {r['weights']} weights, {r['process']} process",
        f"samples: {r['n']} x {r['sampler']}, {r['steps']} steps, {r['spacing']} spacing, seed {r['seed']}",
    ]
    if r.get("guidance"):
        lines.append("guidance: " + ", ".join(f"{k} {v}" for k, v in r["guidance"].items()))
    if r["kind"] == "points":
        lines += [
            f"{'':22}{'samples':>12}{'fresh data':>12}   (against {r['reference']['fresh_points']} fresh points)",
            f"{'energy distance':22}{r['energy_distance']:12.5f}{r['real_fresh']['energy_distance']:12.5f}",
            f"{'sliced Wasserstein-2':22}{r['sliced_wasserstein']:12.5f}{r['real_fresh']['sliced_wasserstein']:12.5f}",
        ]
    else:
        f = r["features"]
        acc = f" (test accuracy {100 * f['test_accuracy']:.2f}%)" if f.get("test_accuracy") is not None else ""
        lines.append(f"features: {f['name']} {f['kind']}{acc}, sha256 {f['sha256'][:12]}")
        ref, floor = r["reference"], r.get("real_vs_real") or {}
        floor_head = f"real {floor['split']} (n={floor['n']})" if floor else ""
        lines.append(f"against {ref['n']} real {ref['split']} images: {'samples':>12}{floor_head:>22}")
        kid_s = f"{1e3 * r['kid']['mean']:.3f} ± {1e3 * r['kid']['stderr']:.3f}"
        kid_f = f"{1e3 * floor['kid']['mean']:.3f} ± {1e3 * floor['kid']['stderr']:.3f}" if floor else ""
        rows = [
            ("FD", f"{r['fd']:.3f}", f"{floor['fd']:.3f}" if floor else ""),
            ("KID x 1e3", kid_s, kid_f),
            ("precision (k=3)", f"{r['precision']:.3f}", f"{floor['precision']:.3f}" if floor else ""),
            ("recall (k=3)", f"{r['recall']:.3f}", f"{floor['recall']:.3f}" if floor else ""),
        ]
        lines += [f"  {name:28}{a:>12}{b:>22}" for name, a, b in rows]
        c = r["classes"]
        if c.get("samples") is None:
            lines.append(f"classes: - ({c['reason']})")
        else:
            if c.get("accuracy") is not None:
                lines.append(
                    f"class accuracy (the class asked for, as the classifier sees it): {100 * c['accuracy']:.1f}%"
                )
            lines.append(f"classes as the classifier sees them (total variation {c['total_variation']:.3f}):")
            lines.append(f"  {'class':16}{'samples':>9}{'real':>9}{'labels':>9}")
            labels = c["real_labels"] or [None] * len(c["names"])
            for name, s, q, lab in zip(c["names"], c["samples"], c["real"], labels):
                real_label = _num(None if lab is None else 100 * lab, "8.1f") + ("%" if lab is not None else "")
                lines.append(f"  {name[:16]:16}{100 * s:8.1f}%{100 * q:8.1f}%{real_label}")
    if r.get("text"):
        lines += _format_text(r["text"])
    lines += format_likelihood(r)
    s = r.get("seconds")
    if s:
        lines.append("time: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in s.items()))
    return "\n".join(lines)


def format_likelihood(r: dict) -> list[str]:
    """The bound (with its coarser grids) and the ODE's bits/dim, one line each."""
    lines = []
    b = r["bits_per_dim"]
    if b["total"] is None:
        lines.append(f"bits/dim: - ({b['reason']})")
    else:
        lines.append(f"bits/dim of {b['n']} {b['split']} image{'s' * (b['n'] != 1)} (bound): " + _bound_line(b))
        for steps, at in (b.get("at_steps") or {}).items():
            lines.append(f"  the bound at {steps} steps: " + _bound_line(at))
    o = r.get("ode_bits_per_dim")
    if o is not None:
        if o["total"] is None:
            lines.append(f"ODE bits/dim: - ({o['reason']})")
        else:
            probes = "exact divergence" if o["divergence"] == "exact" else f"Hutchinson, {o['probes']} probe(s)"
            if o.get("hutchinson_stderr") is not None:
                probes += f", ± {o['hutchinson_stderr']:.4f} of it from the probes"
            lines.append(
                f"ODE bits/dim of {o['n']} {o['split']} {o['items']}: {o['total']:.4f} ± {o['total_stderr']:.4f} "
                f"({o['dequantization']} dequantisation, {probes}; NFE {o['nfe']:.0f}, rtol {o['rtol']:g})"
            )
    return lines


def _bound_line(b: dict) -> str:
    if b["variance"] == "continuous":
        parts = f"prior {b['prior']:.4f} + diffusion {b['terms']:.4f} + decoder {b['decoder']:.4f}; continuous time"
    else:
        parts = (
            f"L_T {b['prior']:.4f} + sum L_t-1 {b['terms']:.4f} + L_0 {b['decoder']:.4f}; "
            f"variance {b['variance']}, {b['steps']} steps"
        )
    return f"{b['total']:.4f} ± {b['stderr']:.4f} ({parts})"
