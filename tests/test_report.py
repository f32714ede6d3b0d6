"""report.html is self-contained: every image is an embedded, decodable, non-empty PNG."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser
from pathlib import Path

from PIL import Image

from insitu.config import load_config
from insitu.exports.html import markdown_to_html, write_html_report
from insitu.pipelines.pretrain import pretrain
from insitu.pipelines.probe import run_probe
from insitu.pipelines.report import write_pretrain_report
from tests.conftest import tiny_config, write_shapes


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.alts: list[str] = []
        self.tags: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(a.get("src", ""))
            self.alts.append(a.get("alt", ""))
        if tag in ("link", "script") and (a.get("href") or a.get("src")):
            self.links.append(a.get("href") or a.get("src"))


def check_embedded(path: Path) -> _Collect:
    """Parse the report; every <img> must be a data URI that decodes to a non-empty PNG; no external files."""
    parser = _Collect()
    parser.feed(path.read_text(encoding="utf-8"))
    assert parser.images, f"{path} has no images"
    assert not parser.links
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        im.load()
        assert im.width > 10 and im.height > 10
        low, high = im.convert("L").getextrema()
        assert high > low  # not a blank canvas
    return parser


def test_markdown_subset_to_html():
    out = markdown_to_html("| a | b |\n|---|---|\n| 1 | `x<y` |\n\n- one\n- two\n\n```\nk: v\n```")
    assert "<th>a</th>" in out and "<td><code>x&lt;y</code></td>" in out
    assert "<li>two</li>" in out and "<pre>k: v</pre>" in out


def test_html_report_skips_missing_figures(tmp_path):
    Image.new("RGB", (20, 20), (10, 20, 30)).save(tmp_path / "a.png")
    im = Image.open(tmp_path / "a.png")
    im.putpixel((0, 0), (255, 255, 255))
    im.save(tmp_path / "a.png")
    out = write_html_report(tmp_path / "r.html", "t", [("h", "text")], [("a", tmp_path / "a.png"), ("b", tmp_path / "missing.png")])
    assert len(check_embedded(out).images) == 1


def test_lead_figure_follows_the_verdict_before_other_images(tmp_path):
    from insitu.exports.plots import forest_plot
    from insitu.exports.report import write_report
    from tests.test_forest_plot import probe_rows

    forest = forest_plot(probe_rows(), tmp_path / "forest_plot.png")
    Image.new("RGB", (20, 20), (10, 20, 30)).save(tmp_path / "a.png")
    im = Image.open(tmp_path / "a.png")
    im.putpixel((0, 0), (255, 255, 255))
    im.save(tmp_path / "a.png")
    sections = [("Verdict", "the verdict"), ("Later", "more")]
    out = write_html_report(tmp_path / "r.html", "t", sections, [("a", tmp_path / "a.png")], ("forest", forest))
    text = out.read_text()
    assert text.index("the verdict") < text.index("alt='forest'") < text.index("<h2>Later")
    assert check_embedded(out).alts == ["forest", "a"]
    md = write_report(tmp_path, "t", sections, None, ("forest", forest)).read_text()
    assert md.index("the verdict") < md.index("![forest](forest_plot.png)") < md.index("## Later")


def test_pretrain_report_has_everything_embedded(tmp_path):
    shapes = write_shapes(tmp_path / "shapes", 5)
    cfg = load_config(tiny_config(shapes, tmp_path / "runs", train={"max_steps": 3, "batch_size": 4, "log_every": 1}, probe={"knn_k": 3}))
    result = pretrain(cfg, quiet=True)
    out = write_pretrain_report(cfg, result, run_probe(cfg, [result.adapter_dir]))
    parser = check_embedded(out)
    assert len(parser.images) == 5  # forest plot, loss, collapse metric, training health, t-SNE embedding
    assert parser.alts[0].startswith("Δ vs frozen for every probe row")  # the forest plot opens the figures
    text = out.read_text()
    for needle in ("Verdict", "Probe before/after", "frozen backbone", "trainable", "Quarantined", "KiB", "Config", "Training health"):
        assert needle in text
    assert text.index("<h2>Verdict") < text.index("<img") < text.index("<h2>Training<")
    assert "forest_plot.png" in (result.run_dir / "report.md").read_text()


def test_evaluate_report_embeds_every_image(tmp_path):
    from insitu.pipelines.evaluate import evaluate

    shapes = write_shapes(tmp_path / "shapes", 5)
    cfg = tiny_config(shapes, tmp_path / "runs", probe={"test_fraction": 0.4, "knn_k": 3})
    cfg["downstream"] = {"steps": 2, "batch_size": 8, "shots": [1]}
    evaluate(load_config(cfg), [], tmp_path / "eval")
    assert len(check_embedded(tmp_path / "eval" / "report.html").images) == 3  # bars, t-SNE, few-shot
