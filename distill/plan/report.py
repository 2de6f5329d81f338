"""The plan as a readable table (`distill plan` without --json)."""

from __future__ import annotations

from distill.plan.memory import GIB


def _m(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _n(x: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _header(p: dict) -> list[str]:
    hw, r = p["hardware"], p["rates"]
    how = "MEASURED on this machine" if r["source"] == "measured" else "ASSUMED (peak x MFU; --measure to measure)"
    return [f"plan for recipe {p['recipe']!r} on {hw['gpus']} x {hw['name']} ({hw['note']}), ZeRO {hw['zero']}, "
            f"{p['budget']['minutes']:g} min",
            f"  rates {how}: forward {r['forward_flops'] / 1e12:.3g} TFLOP/s, train {r['train_flops'] / 1e12:.3g} "
            f"TFLOP/s per device ({hw['tflops']:g} TFLOPS peak), memory {r['bandwidth'] / 1e9:g} GB/s, "
            f"disk {r['disk'] / 1e9:g} GB/s read, {r['save'] / 1e9:g} GB/s write"]


def _models(p: dict) -> list[str]:
    out = []
    for g in p["models"]["teacher_groups"]:
        names = ", ".join(f"{t['name']}" + (f" (+{_n(t['adapter_params'])} LoRA)" if t["adapter_params"] else "")
                          + (" online" if t["online"] else "") for t in g["teachers"])
        out.append(f"  teachers on {g['model']}: {g['model_type']}, {_n(g['params'])} params, {g['dtype']}"
                   f"{'' if g['quantization'] == 'none' else ' ' + g['quantization']}, {g['weights_gib']} GiB "
                   f"(loaded once): {names}")
    s = p["models"]["student"]
    out.append(f"  student {s['model']}: {_n(s['params'])} params, {_n(s['trainable'])} trainable"
               f"{' (LoRA)' if s['lora'] else ''}{', gradient checkpointing' if s['gradient_checkpointing'] else ''}")
    d = p["data"]
    out.append(f"  data: {d['samples']} samples, {_n(d['tokens'])} tokens, {_n(d['targets'])} targets "
               f"({d['note']})")
    return out


def _stages(p: dict) -> list[str]:
    st, mem = p["stages"], p["hardware"]["memory_gib"]
    cap, tr, ev = st["capture"], st["train"], st["eval"]
    c = cap["cache"]
    rows = [("stage", "time", "peak memory", "what"),
            ("capture", _m(cap["seconds"]), f"{cap['peak_bytes'] / GIB:.1f} GiB",
             f"forward {_m(cap['forward_s'])}; cache {c['total_bytes'] / 1e6:.1f} MB on disk "
             f"({c['codec']}, {c['record_bytes']} B per target per teacher, {c['cached_teachers']} teachers)"),
            ("train", _m(tr["seconds"]), f"{tr['peak_bytes'] / GIB:.1f} GiB",
             f"{tr['steps']} steps x {tr['step_s']:.2f} s, {tr['tokens_per_s']:.0f} tokens/s; set-up "
             f"{_m(tr['setup_s'])}, save {_m(tr['save_s'])}"),
            ("eval", _m(ev["seconds"]), f"{ev['peak_bytes'] / GIB:.1f} GiB",
             f"{len(ev.get('per_model_s', {}))} models x "
             + ", ".join(f"{'+'.join(t['tasks'])} ({t['examples']})" for t in ev["tasks"]))]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  " + "  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    lines.append(f"  (device memory {mem:g} GiB; train memory: "
                 + ", ".join(f"{k} {v}" for k, v in tr["memory"].items()) + " GiB)")
    return lines


def _budget(p: dict) -> list[str]:
    b = p["budget"]
    s, cal = b["split_minutes"], b["calibration"]
    lines = [f"  budget {b['minutes']:g} min: capture {s['capture']:.1f}, train {s['train']:.1f}, eval {s['eval']:.1f}, "
             f"spare {s['spare']:.1f} min (the recipe as written needs {b['recipe_needs_minutes']:.1f} min)",
             f"  calibration tokens that fit: {_n(cal['tokens_that_fit'])} (recipe: {_n(cal['recipe_tokens'])}); "
             f"proposed {_n(cal['proposed_tokens'])} tokens, {cal['proposed_samples']} samples, "
             f"{b['proposed_steps']} steps"]
    if b["overrides"]:
        lines.append("  overrides (distill run RECIPE --plan PLAN.json applies them): " + " ".join(b["overrides"]))
    return lines


def render(p: dict) -> str:
    lines = _header(p) + _models(p) + _stages(p) + _budget(p)
    if p.get("measured"):
        m = p["measured"]
        lines.append(f"  measured: {m['summary']}")
    lines += [f"WARNING {w}" for w in p["warnings"]] or ["  fits: every stage within memory and time"]
    return "\n".join(lines)
