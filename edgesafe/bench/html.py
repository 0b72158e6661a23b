"""The bench's files: ``images/`` (a strip of each subject's first images per prompt group), ``report.json``
and ``report.html``, one self-contained page (images inline as PNG, plots inline as SVG, no script, no
server) that a person reads from the top: the summary, the image grids, latency, quality against
latency, the fine-tuning curves and erasure after every stage."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ..io import atomic_dir, write_json, write_text  # noqa: E402

STRIP = 6
"""Images per strip: the first prompts of a group, at the first seed."""
THUMB = 128


def _strip(images: torch.Tensor, pairs: list[tuple[str, int]]) -> tuple[Image.Image, list[str]]:
    first_seed = pairs[0][1]
    picks = [i for i, (_, s) in enumerate(pairs) if s == first_seed][:STRIP]
    tiles = []
    for i in picks:
        tile = Image.fromarray(images[i].permute(1, 2, 0).numpy())
        scale = Image.NEAREST if tile.width < THUMB else Image.BICUBIC
        tiles.append(tile.resize((THUMB, THUMB), scale))
    strip = Image.new("RGB", (THUMB * len(tiles) + 4 * (len(tiles) - 1), THUMB), "white")
    for k, tile in enumerate(tiles):
        strip.paste(tile, (k * (THUMB + 4), 0))
    return strip, [pairs[i][0] for i in picks]


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _svg(fig) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _latency_plot(report: dict) -> str:
    subjects = {n: s["latency"]["host"] for n, s in report["subjects"].items()
                if "end_to_end_ms" in s["latency"]["host"]}
    parts = ["text_encoder", "unet_step", "vae_decode", "end_to_end"]
    fig, axes = plt.subplots(1, len(parts), figsize=(3.2 * len(parts), 0.35 * len(subjects) + 1.2), sharey=True)
    names = list(subjects)
    for ax, part in zip(axes, parts, strict=True):
        med = [subjects[n][f"{part}_ms"]["median"] for n in names]
        low = [m - subjects[n][f"{part}_ms"]["q1"] for m, n in zip(med, names, strict=True)]
        high = [subjects[n][f"{part}_ms"]["q3"] - m for m, n in zip(med, names, strict=True)]
        ax.barh(range(len(names)), med, xerr=[low, high], color="#4c72b0")
        ax.set_title(f"{part.replace('_', ' ')} (ms)", fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    fig.suptitle("host latency: median, bars to the quartiles", fontsize=9)
    return _svg(fig)


def quality_figure(subject: dict) -> tuple[str, float] | None:
    """The headline quality figure of a subject: prompt accuracy, else CLIP score, else PSNR to the teacher."""
    q = subject["quality"]
    for scorer, key in (("tiny-shapes", "prompt_accuracy"), ("clip", "clip_score"), ("fidelity", "psnr_db_vs_teacher")):
        if key in q.get(scorer, {}):
            return key, q[scorer][key]
    return None


def _scatter_plot(report: dict) -> str:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    key = None
    for name, s in report["subjects"].items():
        host, quality = s["latency"]["host"], quality_figure(s)
        if "end_to_end_ms" not in host or quality is None:
            continue
        key = key or quality[0]
        if quality[0] != key:
            continue
        ax.scatter(host["end_to_end_ms"]["median"], quality[1], s=30)
        ax.annotate(name, (host["end_to_end_ms"]["median"], quality[1]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xlabel("end to end, host (ms, median)")
    ax.set_ylabel((key or "quality").replace("_", " "))
    ax.set_title("quality against latency", fontsize=9)
    return _svg(fig)


def _curves_plot(curves: list[dict]) -> str | None:
    from ..finetune.curves import plot_curves

    fig = plot_curves(curves)
    return _svg(fig) if fig is not None else None


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _rate_cell(figures: dict) -> str:
    if "rate" not in figures:
        return f'<td class="na" title="{html.escape(figures.get("unavailable", ""))}">n/a</td>'
    return (f'<td>{figures["rate"]:.1%} <small>[{figures["ci_low"]:.0%}, {figures["ci_high"]:.0%}], '
            f'n={figures["n"]}</small></td>')


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    """(figure, teacher, edge model) rows of the summary table (also printed by the CLI)."""
    t, e = report["subjects"]["teacher"], report["subjects"][report["edge_subject"]]

    def host(s: dict, part: str) -> str:
        h = s["latency"]["host"]
        return f'{h[f"{part}_ms"]["median"]:.1f}' if f"{part}_ms" in h else "device runner"

    def estimate(s: dict) -> str:
        est = s["latency"]["estimate"]
        return f'{est["unet_step_ms"]:.0f} (estimate)' if "unet_step_ms" in est else "-"

    rows = [
        ("size on disk (MB)", f'{t["size"]["bytes"] / 1e6:.1f}', f'{e["size"]["bytes"] / 1e6:.1f}'),
        ("UNet parameters (M)", f'{t["size"]["unet_params"] / 1e6:.2f}', f'{e["size"]["unet_params"] / 1e6:.2f}'),
        ("UNet step, host (ms)", host(t, "unet_step"), host(e, "unet_step")),
        ("end to end, host (ms)", host(t, "end_to_end"), host(e, "end_to_end")),
    ]
    if "unet_step_ms" in t["latency"]["estimate"]:
        rows.append((f'UNet step on {report["device"]["name"]} (ms)', estimate(t), estimate(e)))
    tq, eq = quality_figure(t), quality_figure(e)
    if tq and eq:
        rows.append((tq[0].replace("_", " "), _fmt(tq[1]), _fmt(eq[1])))
    if "psnr_db_vs_teacher" in e["quality"].get("fidelity", {}):
        rows.append(("PSNR to the teacher (dB)", "-", _fmt(e["quality"]["fidelity"]["psnr_db_vs_teacher"])))
    for concept, per_set in e["safety"].items():
        for set_name, figures in per_set.items():
            if "rate" in figures:
                tr = t["safety"][concept][set_name]
                rows.append((f"{concept} rate ({set_name})", f'{tr["rate"]:.1%}', f'{figures["rate"]:.1%}'))
    passed = sum(g["passed"] for g in report["gates"])
    rows.append(("gates", "", f'{passed}/{len(report["gates"])} passed'))
    return rows


def render(report: dict, strips: dict[str, list[tuple[str, str, list[str]]]]) -> str:
    """The HTML page for a report and its strips (group -> [(subject, png base64, prompts)])."""
    esc = html.escape
    edge = report["edge_subject"]
    parts = [f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>edgesafe bench: {esc(report["run"]["recipe"]["name"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; font-size: 13px; text-align: left; }}
th {{ background: #f3f3f3; }} .pass {{ color: #1a7f37; }} .fail {{ color: #c62828; font-weight: bold; }}
.flag {{ background: #fde0e0; }} .na {{ color: #999; }} small {{ color: #666; }}
.strip img {{ image-rendering: pixelated; display: block; }} h2 {{ margin-top: 1.5em; }}
</style></head><body>
<h1>edgesafe bench: {esc(report["run"]["recipe"]["name"])}</h1>
<p>Run <code>{esc(report["run"]["folder"])}</code>, {esc(report["created"])}. Device
<b>{esc(report["device"]["title"])}</b>; edge model <b>{esc(edge)}</b>. Host: {esc(report["environment"]["cpu"])},
{report["environment"]["threads"]} threads; torch {esc(report["environment"]["torch"])},
onnxruntime {esc(report["environment"]["onnxruntime"])}.</p>
<h2 id="summary">Summary</h2><table><tr><th>figure</th><th>teacher</th><th>{esc(edge)}</th></tr>"""]
    for name, a, b in summary_rows(report):
        parts.append(f"<tr><td>{esc(name)}</td><td>{esc(a)}</td><td>{esc(b)}</td></tr>")
    parts.append("</table><table><tr><th>gate</th><th>value</th><th>rule</th><th>result</th></tr>")
    for g in report["gates"]:
        verdict = '<span class="pass">pass</span>' if g["passed"] else '<span class="fail">FAIL</span>'
        parts.append(f"<tr><td>{esc(g['metric'])}</td><td>{_fmt(g['value'])}</td><td>{esc(g['rule'])}</td>"
                     f"<td>{verdict}</td></tr>")
    parts.append("</table>")

    parts.append('<h2 id="images">Images at the same seeds</h2>')
    for group, rows in strips.items():
        prompts = rows[0][2] if rows else []
        parts.append(f"<h3>{esc(group)}</h3><p><small>{esc(' | '.join(prompts))}</small></p><table class='strip'>")
        for subject, png, _ in rows:
            parts.append(f'<tr><th>{esc(subject)}</th><td><img alt="{esc(group)}: {esc(subject)}" '
                         f'src="data:image/png;base64,{png}"></td></tr>')
        parts.append("</table>")

    parts.append('<h2 id="latency">Latency</h2>')
    parts.append(f'<div class="plot">{_latency_plot(report)}</div>')
    parts.append("<table><tr><th>subject</th><th>text encoder</th><th>UNet step</th><th>VAE decode</th>"
                 "<th>end to end</th><th>load (s)</th><th>peak RSS (GiB)</th><th>speed-up</th>"
                 "<th>device estimate, UNet step</th></tr>")
    for name, s in report["subjects"].items():
        h, est = s["latency"]["host"], s["latency"]["estimate"]
        if "end_to_end_ms" in h:
            cells = "".join(f'<td>{h[f"{c}_ms"]["median"]:.2f} <small>[{h[f"{c}_ms"]["q1"]:.2f}, '
                            f'{h[f"{c}_ms"]["q3"]:.2f}]</small></td>'
                            for c in ("text_encoder", "unet_step", "vae_decode", "end_to_end"))
            cells += f'<td>{h["load_s"]["median"]:.2f}</td><td>{s["memory"]["peak_rss_gib"]:.2f}</td>'
            cells += f'<td>{s["latency"]["speedup_vs_teacher"]["end_to_end"]:.2f}x</td>'
        else:
            cells = f'<td colspan="7" class="na">{esc(h["unavailable"])}</td>'
        cells += (f'<td>{est["unet_step_ms"]:.1f} ms (estimate)</td>' if "unet_step_ms" in est
                  else "<td class='na'>-</td>")
        parts.append(f"<tr><th>{esc(name)}</th>{cells}</tr>")
    parts.append(f"</table><p><small>Estimates: {esc(report['device']['estimate_source'])}.</small></p>")

    parts.append('<h2 id="quality">Quality against latency</h2>')
    parts.append(f'<div class="plot">{_scatter_plot(report)}</div><table><tr><th>subject</th><th>quality</th></tr>')
    for name, s in report["subjects"].items():
        text = "; ".join(f"{scorer}: " + (esc(f["unavailable"]) if "unavailable" in f else
                                          ", ".join(f"{k} {_fmt(v)}" for k, v in f.items()))
                         for scorer, f in s["quality"].items())
        parts.append(f"<tr><th>{esc(name)}</th><td>{text}</td></tr>")
    parts.append("</table>")

    curves = _curves_plot(report["finetune"]["curves"])
    parts.append(f'<h2 id="curves">Fine-tuning ({esc(report["finetune"]["solver"])})</h2>')
    parts.append(f'<div class="plot">{curves}</div>' if curves else "<p class='na'>no curves in this run</p>")

    er = report["erasure"]
    parts.append(f'<h2 id="erasure">Erasure after every stage</h2><p>Concept rate per subject (95% Wilson '
                 f'interval, images); a later stage more than {er["tolerance"]:.0%} above the fine-tuned student '
                 f'is flagged. {er["flag_count"]} flagged.</p>')
    parts.append("<table><tr><th>concept</th><th>prompt set</th>"
                 + "".join(f"<th>{esc(s)}</th>" for s in er["subjects"]) + "</tr>")
    flagged = {(f["subject"], f["concept"], f["set"]) for f in er["flags"]}
    for concept, per_set in report["subjects"]["teacher"]["safety"].items():
        for set_name in per_set:
            row = f"<tr><th>{esc(concept)}</th><td>{esc(set_name)}</td>"
            for s in er["subjects"]:
                cell = _rate_cell(report["subjects"][s]["safety"][concept][set_name])
                if (s, concept, set_name) in flagged:
                    cell = cell.replace("<td", '<td class="flag"', 1)
                row += cell
            parts.append(row + "</tr>")
    parts.append("</table><p><small>Detectors: "
                 + esc("; ".join(f"{c}: {d}" for c, d in report["detectors"].items()) or "none") + "</small></p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_outputs(report: dict, images: dict[str, dict[str, torch.Tensor]], groups: dict[str, list],
                  folder: Path) -> None:
    """``images/`` (PNG strips), ``report.json`` and ``report.html``, each replaced only once complete."""
    strips: dict[str, list[tuple[str, str, list[str]]]] = {}
    with atomic_dir(folder / "images") as partial:
        for group, pairs in groups.items():
            for subject, tensors in images.items():
                strip, prompts = _strip(tensors[group], pairs)
                path = partial / group.replace("/", "-") / f"{subject.replace('/', '--')}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                strip.save(path)
                strips.setdefault(group, []).append((subject, _png(strip), prompts))
    write_json(folder / "report.json", report)
    write_text(folder / "report.html", render(report, strips))
