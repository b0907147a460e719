"""Pipelines (the context list): declaration checks, and the read-digits example end to end."""

import json

import numpy as np
import pytest
import yaml

from shoal.client.http import InferError
from shoal.examples.read_digits import MODELS, PIPELINE, make_number_image
from shoal.gateway.pipeline import PipelineError, parse_pipelines


def test_parse_the_example():
    spec = parse_pipelines(PIPELINE)["read-digits"]
    assert [s.name for s in spec.steps] == ["detect", "classify", "join"]
    assert spec.steps[1].fanout == "image" and spec.steps[1].inputs == {"image": ("detect", "crops")}
    assert spec.outputs["number"] == ("join", "number")


@pytest.mark.parametrize(
    "decl, key",
    [
        ({"p": {"steps": []}}, "p.steps"),
        (
            {"p": {"steps": [{"model": "m", "inputs": {"x": "later.y"}}], "outputs": {"y": "m.y"}}},
            "p.steps[0].inputs.x",
        ),
        (
            {
                "p": {
                    "steps": [{"model": "m", "inputs": {"x": "request.x"}, "fanout": "z"}],
                    "outputs": {"y": "m.y"},
                }
            },
            "fanout",
        ),
        (
            {"p": {"steps": [{"model": "m", "inputs": {"x": "request.x"}}], "outputs": {"y": "nope.y"}}},
            "p.outputs.y",
        ),
        (
            {
                "p": {
                    "steps": [{"model": "m", "inputs": {"x": "request.x"}, "colour": 1}],
                    "outputs": {"y": "m.y"},
                }
            },
            "colour",
        ),
        (
            {
                "p": {
                    "steps": [
                        {"model": "m", "inputs": {"x": "request.x"}},
                        {"model": "m", "inputs": {"x": "m.y"}},
                    ],
                    "outputs": {"y": "m.y"},
                }
            },
            "used twice",
        ),
    ],
)
def test_bad_declarations_name_the_key(decl, key):
    with pytest.raises(PipelineError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse_pipelines(decl)


def test_read_digits_end_to_end(cluster, tmp_path):
    from shoal.data.mnist import load_mnist

    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(yaml.safe_dump({"pipelines": PIPELINE}))
    lc = cluster(gateway_args=["--config", str(cfg)])
    for m in MODELS:
        lc.add_worker(m)
    lc.add_worker("mnist-cnn")
    for m in MODELS:
        lc.wait_workers(m, 1)
    images, labels = load_mnist("test")
    rng = np.random.default_rng(7)
    right = 0
    n = 40
    with lc.client() as c:
        code, meta = c.get_json("/v2/models/read-digits")
        assert code == 200 and meta["platform"] == "pipeline"
        assert [t["name"] for t in meta["inputs"]] == ["image"]
        assert {t["name"] for t in meta["outputs"]} == {"number", "boxes", "logits"}
        assert c.get_json("/v2/models/read-digits/ready")[1]["ready"] is True
        for _ in range(n):
            png, number, frames = make_number_image(rng, images, labels)
            out = c.infer_raw("read-digits", png)
            got = out["number"].reshape(-1)[0]
            got = got.decode() if isinstance(got, bytes) else str(got)
            right += got == number
            boxes = out["boxes"]
            assert len(boxes) == len(number)
            for (x0, y0, x1, y1), (fx0, fy0, fx1, fy1) in zip(boxes.tolist(), frames, strict=True):
                assert fx0 <= x0 < x1 <= fx1 and fy0 <= y0 < y1 <= fy1
        assert right / n >= 0.85, right
        with pytest.raises(InferError) as e:
            c.infer_raw("read-digits", b"not an image")
        assert "step 'detect'" in str(e.value)
        code, body = c.get_json("/v2/status")
        assert body["pipelines"] == [{"name": "read-digits", "version": "1", "ready": True}]
        # Statistics and configuration of the pipeline (an ensemble) and of a step's model.
        code, stats = c.get_json("/v2/models/read-digits/stats")
        inf = stats["model_stats"][0]["inference_stats"]
        assert code == 200 and inf["success"]["count"] == n and inf["fail"]["count"] == 1
        code, stats = c.get_json("/v2/models/mnist-cnn/stats")
        assert stats["model_stats"][0]["inference_stats"]["compute_infer"]["count"] >= right
        code, cfg = c.get_json("/v2/models/read-digits/config")
        assert code == 200 and cfg["platform"] == "ensemble"
        steps = cfg["ensemble_scheduling"]["step"]
        assert [s["model_name"] for s in steps] == ["digit-detector", "mnist-cnn", "digits-to-number"]
        assert steps[1]["input_map"] == {"image": "detect.crops"} and steps[1]["output_map"] == {"logits": "logits"}
    # Classification of a pipeline's output: each fanned-out crop's best digit, with its label.
    httpclient = pytest.importorskip("tritonclient.http")
    png, number, _ = make_number_image(rng, images, labels)
    tc = httpclient.InferenceServerClient(f"127.0.0.1:{lc.http_port}")
    inp = httpclient.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([png], dtype=object))
    out = httpclient.InferRequestedOutput("logits", class_count=1)
    r = tc.infer("read-digits", [inp], outputs=[out], headers={"Authorization": f"Bearer {lc.api_key}"})
    best = [(v.decode() if isinstance(v, bytes) else v).split(":") for v in r.as_numpy("logits").reshape(-1)]
    assert len(best) == len(number) and all(label == index for _, index, label in best)
    tc.close()
    served = {
        w["worker_id"]: w["served"]
        for m in lc.status()["models"]
        if m["name"] == "mnist-cnn"
        for w in m["workers"]
    }
    assert len(served) == 2 and all(v > 0 for v in served.values()), served  # the fan-out spread over both
    assert json.dumps(served)
