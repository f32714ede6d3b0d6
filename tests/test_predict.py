"""Sliding-window prediction and the native-format exports, round-tripped through their libraries."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pydicom
import pytest
import rasterio
import torch
from PIL import Image

from insitu.cli import main
from insitu.config import load_config
from insitu.domains.synthetic import write_shape_pairs
from insitu.errors import ConfigError
from insitu.pipelines.finetune import finetune
from insitu.pipelines.head_folder import load_head
from insitu.pipelines.predict import make_predictor, predict, sliding_window
from tests.conftest import tiny_config

SEG_DATA = {"domain": "video", "image_size": 32, "options": {"crop_fov": False, "decode_size": 32}}
DS = {"task": "segmentation", "head": "fpn", "steps": 2, "batch_size": 4, "decoder_dim": 8}


@pytest.fixture(scope="module")
def seg_model(tmp_path_factory) -> Path:
    """A tiny FPN segmentation model fine-tuned on generated image/mask pairs (RGB, 32 px)."""
    tmp = tmp_path_factory.mktemp("seg")
    root = write_shape_pairs(tmp / "pairs", n=8, size=32)
    cfg = load_config(tiny_config(root, tmp, data={**SEG_DATA, "root": str(root)}, downstream=DS, probe={"test_fraction": 0.3}))
    return finetune(cfg, out_dir=tmp / "model").out_dir


def test_sliding_window_equals_single_pass_when_one_window_fits(seg_model):
    model, meta, norm = load_head(seg_model)
    predictor = make_predictor(model, norm, meta["image_size"])
    image = torch.rand(3, 32, 32)
    assert torch.allclose(sliding_window(predictor, image, 32, 0.5, meta["num_classes"]), predictor([image])[0], atol=1e-6)


def test_batched_windows_equal_one_window_per_pass(seg_model):
    model, meta, norm = load_head(seg_model)
    predictor = make_predictor(model, norm, meta["image_size"])
    image = torch.rand(3, 70, 45, generator=torch.Generator().manual_seed(0))
    one = sliding_window(predictor, image, 32, 0.25, meta["num_classes"], batch_size=1)
    batched = sliding_window(predictor, image, 32, 0.25, meta["num_classes"], batch_size=16)
    assert torch.allclose(one, batched, atol=1e-5)


def test_input_with_other_channel_count_is_refused(seg_model):
    model, meta, norm = load_head(seg_model)
    predictor = make_predictor(model, norm, meta["image_size"], channels=meta["in_chans"])
    with pytest.raises(ConfigError, match="3-channel input but this input has 1 channels"):
        predictor([torch.rand(1, 32, 32)])


def test_sliding_window_blends_overlaps_exactly():
    # a per-pixel predictor gives the same value from every window covering a pixel, so any
    # correct weighted blend reproduces it; seams or double counting would not
    def per_pixel(tiles: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.stack([tile[0] * 2, tile[1] - 1]) for tile in tiles]

    image = torch.rand(2, 70, 45)
    out = sliding_window(per_pixel, image, 16, 0.25, 2, batch_size=3)
    assert out.shape == (2, 70, 45)
    assert torch.allclose(out, per_pixel([image])[0], atol=1e-5)


def test_png_masks_and_overlays_via_cli(seg_model, tmp_path):
    src = write_shape_pairs(tmp_path / "new", n=2, size=48, seed=5) / "images"
    before = {p: p.read_bytes() for p in src.iterdir()}
    assert main(["-q", "predict", str(seg_model), str(src), "--out", str(tmp_path / "out"), "--domain", "images"]) == 0
    mask = np.asarray(Image.open(tmp_path / "out" / "shape_0000_mask.png"))
    overlay = Image.open(tmp_path / "out" / "shape_0000_overlay.png")
    assert mask.shape == (48, 48) and set(np.unique(mask)) <= {0, 1}
    assert overlay.size == (48, 48) and overlay.mode == "RGB"
    assert {p: p.read_bytes() for p in src.iterdir()} == before  # sources untouched
    # the mask is the model's own per-pixel argmax on the image, predicted directly in one pass
    model, meta, norm = load_head(seg_model)
    rgb = np.asarray(Image.open(src / "shape_0000.png").convert("RGB"))
    image = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0
    direct = make_predictor(model, norm, meta["image_size"])([image])[0].argmax(0).numpy()
    assert np.array_equal(mask, direct)
    # background pixels keep the (min-max scaled) source colour, class-1 pixels are tinted 45% toward red
    scaled = (rgb.astype(np.float32) - rgb.min()) / max(int(rgb.max()) - int(rgb.min()), 1) * 255
    tinted = 0.55 * scaled + 0.45 * np.array([230, 25, 75], np.float32)
    want = np.where((mask == 1)[..., None], tinted, scaled).round()
    assert np.abs(np.asarray(overlay).astype(np.float32) - want).max() <= 1


def test_video_overlay_mp4_and_frame_csv(seg_model, tmp_path):
    from insitu.domains.video import moving_shape_frames, write_mp4

    video = write_mp4(tmp_path / "in" / "case.mp4", moving_shape_frames(np.random.default_rng(0), 1, 32, n_frames=6), fps=5)
    written = predict(seg_model, video.parent, tmp_path / "out", "video", {"decode_size": 32})
    assert sorted(p.name for p in written) == ["case_frames.csv", "case_overlay.mp4"]
    with av.open(str(tmp_path / "out" / "case_overlay.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 6 and frames[0].shape == (32, 32, 3)
    lines = (tmp_path / "out" / "case_frames.csv").read_text().splitlines()
    assert lines[0] == "frame,time_s,foreground_fraction" and len(lines) == 7
    # each row: its frame index, its time at 5 fps, and the foreground share of the model's mask on that frame
    from insitu.domains import create_domain

    model, meta, norm = load_head(seg_model)
    predictor = make_predictor(model, norm, meta["image_size"])
    decoded = create_domain("video", {"decode_size": 32, "crop_fov": False}).read_frames(str(video), list(range(6)))
    for i, (line, frame) in enumerate(zip(lines[1:], decoded, strict=True)):
        index, time_s, fraction = line.split(",")
        mask = predictor([torch.from_numpy(frame).permute(2, 0, 1).float() / 255.0])[0].argmax(0)
        assert int(index) == i and float(time_s) == pytest.approx(i / 5, abs=1e-3)
        assert float(fraction) == pytest.approx(float((mask > 0).float().mean()), abs=1e-4)


def test_geotiff_prediction_keeps_georeferencing(tmp_path):
    from insitu.domains.geotiff import GeoTiffDomain

    demo = GeoTiffDomain.make_demo(tmp_path / "geo", seed=0, n_per_class=2, size=32)
    backbone = {"in_chans": 6}
    cfg = tiny_config(tmp_path, tmp_path, data=demo.data, backbone=backbone, downstream={k: v for k, v in {**DS, "head": "linear"}.items() if k != "decoder_dim"})
    cfg["probe"] = {"train": demo.probe_train, "test": demo.probe_test}
    model_dir = finetune(load_config(cfg), out_dir=tmp_path / "model").out_dir
    scene = tmp_path / "geo" / "test" / "scene00.tif"
    out = predict(model_dir, scene, tmp_path / "out")[0]
    with rasterio.open(scene) as src, rasterio.open(out) as dst:
        assert (dst.crs, dst.transform, dst.width, dst.height) == (src.crs, src.transform, src.width, src.height)
        classes = dst.read(1)
        nodata = src.read(1) == 0
    assert (classes[nodata] == 255).all() and (classes[~nodata] < 4).all()


def test_dicom_seg_references_the_source_series(seg_model, tmp_path):
    from insitu.domains.dicom_seg import read_seg
    from tests.data.dicom_fixtures import ct_volume, write_series

    files = [str(p) for p in write_series(tmp_path / "ct" / "s", ct_volume(3, (3, 32, 32)))]
    before = [Path(f).read_bytes() for f in files]
    out = predict(seg_model, tmp_path / "ct", tmp_path / "out", "dicom", {"channels": 3, "cache_dir": str(tmp_path / "cache")})
    assert len(out) == 1
    seg = pydicom.dcmread(out[0])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(files[0]).SeriesInstanceUID
    labels = read_seg(str(out[0]), files)
    assert labels.shape == (3, 32, 32) and set(np.unique(labels)) <= {0, 1}
    assert [Path(f).read_bytes() for f in files] == before
    # read back per source file, each frame is the model's mask on that file's slice (files run in z order)
    from insitu.domains import create_domain

    model, meta, norm = load_head(seg_model)
    predictor = make_predictor(model, norm, meta["image_size"])
    domain = create_domain("dicom", {"channels": 3, "cache_dir": str(tmp_path / "cache2"), "plane": "acquisition", "sample": "slice"})
    manifest = domain.scan(tmp_path / "ct")
    items = sorted(manifest.items, key=lambda i: i.extra["index"])
    direct = np.stack([predictor([domain.load(item, manifest)["image"]])[0].argmax(0).numpy() for item in items])
    assert np.array_equal(labels, direct)


def test_prediction_preprocesses_exactly_as_training(tmp_path):
    # a non-square image larger than the model size: resizing must antialias the same way in both paths
    from insitu.config import DataConfig
    from insitu.domains.base import Predictor
    from insitu.domains.normalize import Normalizer
    from insitu.pipelines.data import SampleDataset, ScannedData

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)).save(tmp_path / name / f"{name}.png")
    data = ScannedData.scan(DataConfig(domain="images", root=tmp_path, image_size=32))
    item = data.manifest.items[0]
    norm = Normalizer.fit([data.domain.load(i, data.manifest)["image"] for i in data.manifest.items])
    trained_on = SampleDataset(data, [item], norm, image_size=32)[0]["image"]

    seen = []

    def classifier(x: torch.Tensor) -> torch.Tensor:  # records its input; 2 class logits
        seen.append(x[0].clone())
        return torch.zeros(len(x), 2)

    def segmenter(x: torch.Tensor) -> torch.Tensor:  # records its input; 2 class logit maps
        seen.append(x[0].clone())
        return torch.zeros(len(x), 2, *x.shape[2:])

    image = data.domain.load(item, data.manifest)["image"]
    tiles = make_predictor(classifier, norm, 32)
    Predictor("classification", 2, ["a", "b"], 32, 4, predict=tiles, segment=lambda im: tiles([im])[0]).classify([image])
    make_predictor(segmenter, norm, 32)([image])
    assert seen[0].shape == (3, 32, 32)
    assert torch.equal(seen[0], trained_on) and torch.equal(seen[1], trained_on)
    # the check can fail: a resize without antialiasing (what classification prediction did) differs
    plain = torch.nn.functional.interpolate(norm(image.float())[None], size=(32, 32), mode="bilinear", align_corners=False)[0]
    assert not torch.allclose(plain, trained_on, atol=1e-3)


def test_classification_predictions_csv_in_batches(tmp_path):
    from tests.conftest import write_shapes

    shapes = write_shapes(tmp_path / "shapes", 4)
    cfg = tiny_config(shapes, tmp_path, probe={"test_fraction": 0.4}, downstream={"steps": 2, "batch_size": 8, "val_fraction": 0})
    model_dir = finetune(load_config(cfg), out_dir=tmp_path / "model").out_dir
    new = write_shapes(tmp_path / "new", 2, seed=3)  # 8 images, predicted 3 per pass
    predict(model_dir, new, tmp_path / "out", "images", batch_size=3)
    rows = [line.split(",") for line in (tmp_path / "out" / "predictions.csv").read_text().splitlines()]
    files = sorted(p for p in new.rglob("*.png"))
    assert rows[0] == ["item", "class_index", "class", "probability"] and [r[0] for r in rows[1:]] == [p.stem for p in files]
    model, meta, norm = load_head(model_dir)
    predictor = make_predictor(model, norm, meta["image_size"])
    for row, path in zip(rows[1:], files, strict=True):  # each row is the model's own answer on that file alone
        image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1).float() / 255.0
        probs = predictor([image])[0]
        assert int(row[1]) == int(probs.argmax()) and row[2] == meta["class_names"][int(row[1])]
        assert float(row[3]) == pytest.approx(float(probs.max()), abs=1e-4)


def test_a_domain_without_an_output_format_or_an_unknown_option_is_a_config_error(seg_model, tmp_path):
    with pytest.raises(ConfigError, match="The 'pairs' domain has no prediction output format"):
        predict(seg_model, tmp_path, tmp_path / "out", "pairs")
    with pytest.raises(ConfigError, match="unknown key 'chanels'; did you mean 'channels'"):
        predict(seg_model, tmp_path, tmp_path / "out2", "images", {"chanels": 1})
    assert not (tmp_path / "out2").exists()  # refused before the output folder is claimed
