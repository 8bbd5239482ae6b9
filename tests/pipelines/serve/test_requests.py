"""Request parsing, image checks, auth and settings of the grounding endpoint, without Ray running."""

from __future__ import annotations

import base64
import inspect
import io
import json
import typing
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pydantic
import pytest
import yaml
from PIL import Image
from ray import serve

from pipelines.serve.app import (
    INGRESS_DEPLOYMENT,
    MODEL_DEPLOYMENT,
    build_app,
    limits_from_user_config,
    prepare_item,
)
from pipelines.serve.errors import ApiError
from pipelines.serve.images import open_image
from pipelines.serve.model import BatchSettings
from pipelines.serve.requests import (
    RequestLimits,
    UploadedFile,
    authorize,
    body_kind,
    check_content_length,
    decode_base64_image,
    parse_expression,
    parse_form_request,
    parse_json_request,
    parse_multipart_request,
)
from pipelines.serve.settings import ServeSettings
from tests.pipelines.serve_harness import encode, shapes_image

REPO = Path(__file__).resolve().parents[3]

LIMITS = RequestLimits(max_image_bytes=100_000, max_image_pixels=250_000, max_expression_chars=50)
PNG = encode(shapes_image(64, 48))


def _raises(status: int, code: str, fn, *args) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args)
    assert (info.value.status, info.value.code) == (status, code), info.value.body()
    return info.value


def test_content_types() -> None:
    assert body_kind("application/json; charset=utf-8") == "json"
    assert body_kind("multipart/form-data; boundary=xyz") == "multipart"
    _raises(400, "malformed_multipart", body_kind, "multipart/form-data")
    for bad in ("text/plain", "application/x-www-form-urlencoded", None, "image/png"):
        _raises(415, "unsupported_media_type", body_kind, bad)
    check_content_length("10", 10)
    _raises(413, "request_too_large", check_content_length, "11", 10)
    _raises(400, "bad_content_length", check_content_length, "ten", 10)


def test_json_requests() -> None:
    image = base64.b64encode(PNG).decode()
    request = parse_json_request(json.dumps({"image": image, "expression": "  the circle "}).encode(), LIMITS)
    assert (request.image_bytes, request.expression, request.return_mask) == (PNG, "the circle", True)
    wrapped = "data:image/png;base64," + "\n".join(image[i : i + 76] for i in range(0, len(image), 76))
    options = {"image": wrapped, "expression": "x", "return_mask": False, "mask_format": "PNG", "threshold": 0.5}
    request = parse_json_request(json.dumps(options).encode(), LIMITS)
    assert (request.image_bytes, request.return_mask, request.mask_format, request.threshold) == (
        PNG,
        False,
        "png",
        0.5,
    )

    def body(**fields) -> bytes:
        return json.dumps({"image": image, "expression": "the circle", **fields}).encode()

    _raises(400, "empty_body", parse_json_request, b"", LIMITS)
    _raises(400, "malformed_json", parse_json_request, b'{"image": ', LIMITS)
    _raises(400, "malformed_json", parse_json_request, b"[1, 2]", LIMITS)
    _raises(400, "malformed_json", parse_json_request, b"\xff\xfe", LIMITS)
    _raises(400, "invalid_base64", parse_json_request, body(image="not base64!"), LIMITS)
    assert _raises(422, "missing_field", parse_json_request, b'{"expression": "x"}', LIMITS).field == "image"
    assert _raises(422, "missing_field", parse_json_request, json.dumps({"image": image}).encode(), LIMITS).field == (
        "expression"
    )
    _raises(422, "invalid_field", parse_json_request, body(image=123), LIMITS)
    _raises(422, "invalid_field", parse_json_request, body(expression=["a"]), LIMITS)
    _raises(422, "empty_expression", parse_json_request, body(expression=" \t\n "), LIMITS)
    _raises(422, "expression_too_long", parse_json_request, body(expression="a" * 51), LIMITS)
    _raises(422, "unknown_field", parse_json_request, body(expresion="typo"), LIMITS)
    for threshold in (1.5, -0.1, "high", True):
        _raises(422, "invalid_field", parse_json_request, body(threshold=threshold), LIMITS)
    _raises(422, "invalid_field", parse_json_request, body(mask_format="jpeg"), LIMITS)
    _raises(422, "invalid_field", parse_json_request, body(return_mask="maybe"), LIMITS)
    _raises(413, "image_too_large", decode_base64_image, "A" * 200_000, LIMITS)


def test_json_bodies_that_used_to_pass_or_crash() -> None:
    image = base64.b64encode(PNG).decode()

    def body(**fields) -> bytes:
        return json.dumps({"image": image, "expression": "the circle", **fields}).encode()

    _raises(400, "invalid_base64", parse_json_request, body(image="data:image/png;base64"), LIMITS)  # no comma
    _raises(400, "invalid_base64", parse_json_request, body(image="data:image/png," + image), LIMITS)  # no ;base64
    _raises(400, "malformed_json", parse_json_request, b'{"image": ' + b"[" * 5000 + b"]" * 5000 + b"}", LIMITS)
    digits = _raises(400, "malformed_json", parse_json_request, b'{"threshold": ' + b"9" * 5000 + b"}", LIMITS)
    assert "5000 digits" in digits.message and "sys." not in digits.message
    _raises(400, "malformed_json", parse_json_request, body(threshold=float("nan")), LIMITS)  # NaN is not JSON
    surrogate = body(expression="a").replace(b'"a"', b'"a \\ud800"')
    assert _raises(422, "invalid_text", parse_json_request, surrogate, LIMITS).field == "expression"
    _raises(422, "invalid_text", parse_json_request, body(expression="a").replace(b'"a"', b'"caf\xe9"'), LIMITS)
    twice = body(expression="a")[:-1] + b', "expression": "b"}'
    assert _raises(422, "duplicate_field", parse_json_request, twice, LIMITS).field == "expression"
    # A lone surrogate in a key is refused, and the error body still encodes as UTF-8.
    err = _raises(422, "unknown_field", parse_json_request, b'{"\\udcff": 1}', LIMITS)
    json.dumps(err.body(), ensure_ascii=False).encode("utf-8")


def test_expressions_must_show_something() -> None:
    for invisible in (
        "\u200b",
        "\u200b\u200d\ufeff",
        " \u2060\t\n",
        "\u3164\u115f",
        "\ufe0f\u034f",
        "\u00ad",
        "\x00\x1b",
    ):
        _raises(422, "empty_expression", parse_expression, invisible, LIMITS)
    assert parse_expression(" \u200bthe dog\u200d ", LIMITS) == "\u200bthe dog\u200d"
    for visible in ("🐶", "é", "の犬", "\u0301a"):
        assert parse_expression(visible, LIMITS) == visible
    _raises(422, "invalid_text", parse_expression, "\ud800", LIMITS)
    _raises(422, "invalid_field", parse_expression, 5, LIMITS)


def test_multipart_bodies() -> None:
    boundary = "b0undary"

    def body(*parts: tuple[str, bytes, str | None]) -> bytes:
        out = b""
        for name, data, filename in parts:
            extra = "" if filename is None else f'; filename="{filename}"'
            out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n'.encode()
            out += data + b"\r\n"
        return out + f"--{boundary}--\r\n".encode()

    content_type = f"multipart/form-data; boundary={boundary}"
    good = body(("image", PNG, "x.png"), ("expression", b" the circle ", None), ("threshold", b"0.5", None))
    request = parse_multipart_request(good, content_type, LIMITS)
    assert (request.image_bytes, request.expression, request.threshold) == (PNG, "the circle", 0.5)
    assert parse_multipart_request(good, f'multipart/form-data; boundary="{boundary}"', LIMITS) == request

    image = ("image", PNG, "x.png")
    for data in (b"caf\xe9", b"\xed\xa0\x80", b"\xff"):  # latin-1, a UTF-8-encoded surrogate, a stray byte
        err = _raises(
            422, "invalid_text", parse_multipart_request, body(image, ("expression", data, None)), content_type, LIMITS
        )
        assert err.field == "expression"
    _raises(
        422,
        "empty_expression",
        parse_multipart_request,
        body(image, ("expression", "\u200b".encode(), None)),
        content_type,
        LIMITS,
    )
    _raises(
        422,
        "duplicate_field",
        parse_multipart_request,
        body(image, image, ("expression", b"x", None)),
        content_type,
        LIMITS,
    )
    many = body(image, *[(f"f{i}", b"x", None) for i in range(10_000)])
    _raises(422, "unknown_field", parse_multipart_request, many, content_type, LIMITS)
    _raises(400, "empty_body", parse_multipart_request, b"", content_type, LIMITS)
    _raises(400, "malformed_multipart", parse_multipart_request, good[:-20], content_type, LIMITS)  # no closing
    _raises(400, "malformed_multipart", parse_multipart_request, b"hello", content_type, LIMITS)
    _raises(400, "malformed_multipart", parse_multipart_request, good, "multipart/form-data; boundary=", LIMITS)
    nameless = f"--{boundary}\r\nContent-Disposition: form-data\r\n\r\nx\r\n--{boundary}--\r\n".encode()
    _raises(400, "malformed_multipart", parse_multipart_request, nameless, content_type, LIMITS)


def test_form_requests() -> None:
    file = UploadedFile("x.png", "image/png", PNG)
    request = parse_form_request({"image": [file], "expression": ["the circle"], "return_mask": ["false"]}, LIMITS)
    assert (request.image_bytes, request.expression, request.return_mask) == (PNG, "the circle", False)
    _raises(422, "missing_field", parse_form_request, {"expression": ["x"]}, LIMITS)
    _raises(422, "missing_field", parse_form_request, {"image": [file]}, LIMITS)
    _raises(422, "invalid_field", parse_form_request, {"image": ["text"], "expression": ["x"]}, LIMITS)
    _raises(422, "invalid_field", parse_form_request, {"image": [file], "expression": [file]}, LIMITS)
    _raises(422, "duplicate_field", parse_form_request, {"image": [file, file], "expression": ["x"]}, LIMITS)
    _raises(422, "unknown_field", parse_form_request, {"image": [file], "expression": ["x"], "mask": ["1"]}, LIMITS)
    _raises(422, "invalid_text", parse_form_request, {"image": [file], "expression": [b"caf\xe9"]}, LIMITS)
    assert parse_form_request({"image": [file], "expression": ["café".encode()]}, LIMITS).expression == "café"


def test_images_are_checked_before_decoding() -> None:
    image = open_image(PNG, LIMITS)
    assert image.size == (64, 48)
    _raises(400, "empty_image", open_image, b"", LIMITS)
    _raises(400, "invalid_image", open_image, b"GIF89a but not really an image at all", LIMITS)
    _raises(400, "invalid_image", open_image, b"%PDF-1.4 definitely not a picture", LIMITS)
    _raises(400, "truncated_image", open_image, PNG[: len(PNG) // 2], LIMITS)
    jpeg = encode(shapes_image(64, 48), "JPEG")
    _raises(400, "truncated_image", open_image, jpeg[: len(jpeg) // 2], LIMITS)
    _raises(413, "image_too_large", open_image, PNG + b"\0" * 100_000, LIMITS)
    big = encode(Image.new("L", (600, 500)))  # 300000 pixels in ~1 KB
    assert "600x500" in _raises(413, "too_many_pixels", open_image, big, LIMITS).message
    tiff = encode(shapes_image(32, 32), "TIFF")
    _raises(400, "invalid_image", open_image, tiff, LIMITS)  # a format outside the allowed list


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise for display
    buffer = encode(shapes_image(64, 48), "JPEG")
    out = io.BytesIO()
    Image.open(io.BytesIO(buffer)).save(out, format="JPEG", exif=exif)
    assert open_image(out.getvalue(), LIMITS).size == (48, 64)


def test_prepare_item_letterboxes_like_the_predictor() -> None:
    request = parse_form_request({"image": [UploadedFile("x", None, PNG)], "expression": ["x"]}, LIMITS)
    item, width, height = prepare_item(request, LIMITS, image_size=128)
    assert (width, height) == (64, 48)
    assert item.canvas.shape == (128, 128, 3) and item.canvas.dtype == np.uint8
    assert (item.letterbox.new_w, item.letterbox.new_h) == (128, 96)


def test_auth() -> None:
    authorize(None, None)
    authorize("Bearer s3cret", "s3cret")
    authorize("bearer  s3cret ", "s3cret")
    for header in (None, "", "Bearer wrong", "Basic s3cret", "s3cret", "Bearer s3cret2"):
        err = _raises(401, "unauthorized", authorize, header, "s3cret")
        assert err.headers["WWW-Authenticate"].startswith("Bearer")


def test_settings_from_command_line_args(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = ServeSettings.model_validate(
        {"model": "m", "max_replicas": "4", "num_gpus": "0.5", "mask_threshold": "none", "max_batch_size": "8"}
    )
    assert (settings.max_replicas, settings.num_gpus, settings.max_batch_size) == (4, 0.5, 8)
    assert settings.mask_threshold is None
    assert ServeSettings.model_validate({"model": "m", "precision": "NULL", "auth_token": ""}) == ServeSettings(
        model="m"
    )
    with pytest.raises(ValueError, match="unknown serve args"):
        ServeSettings.model_validate({"model": "m", "replicas": 2})
    with pytest.raises(ValueError, match=r"max_batch_size\n.*valid integer"):
        ServeSettings.model_validate({"model": "m", "max_batch_size": "lots"})
    with pytest.raises(ValueError, match=r"max_replicas\n.*valid integer, got a number with a fractional part"):
        ServeSettings.model_validate({"model": "m", "max_replicas": 2.5})
    with pytest.raises(ValueError, match="max_batch_size"):
        ServeSettings.model_validate({"model": "m", "max_batch_size": 0})
    with pytest.raises(ValueError, match="max_batch_size must not be a bool"):
        ServeSettings.model_validate({"model": "m", "max_batch_size": True})
    with pytest.raises(ValueError, match=r"mask_threshold must be in \[0, 1\]"):
        ServeSettings.model_validate({"model": "m", "mask_threshold": 2})
    with pytest.raises(ValueError, match="min_replicas"):
        ServeSettings.model_validate({"model": "m", "min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ValueError, match="model is required"):
        ServeSettings.model_validate({"model": ""})
    with pytest.raises(ValueError, match=r"model\n.*Field required"):
        ServeSettings.model_validate({})
    with pytest.raises(ValueError, match="precision must be one of"):
        ServeSettings.model_validate({"model": "m", "precision": "fp16"})
    with pytest.raises(ValueError, match="max_image_bytes must be a positive int"):
        ServeSettings.model_validate({"model": "m", "max_image_bytes": 0})
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        settings.model = "other"  # type: ignore[misc]

    monkeypatch.setenv("VGLAW_SERVE_TOKEN", "from-env")
    # NOTE: Serve has no public accessor for a built application's deployments, hence the private attributes.
    ingress = build_app(ServeSettings(model="m", min_replicas=1, max_replicas=3))._bound_deployment
    model = ingress.init_args[0]._bound_deployment
    assert (ingress.name, ingress.init_args[1]) == ("GroundingAPI", "from-env")
    assert (model.name, model.init_args) == ("GroundingModel", ("m", "auto", None))
    bf16 = build_app({"model": "m", "device": "cpu", "precision": "bf16"})._bound_deployment.init_args[0]
    assert bf16._bound_deployment.init_args == ("m", "cpu", "bf16")
    autoscaling = model._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 3)
    assert model.user_config == {"max_batch_size": 16, "batch_wait_timeout_s": 0.01, "mask_threshold": None}
    assert ingress.user_config == asdict(RequestLimits())


def test_build_app_is_a_typed_application_builder() -> None:
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    # Serve validates the args into the builder's annotation only when that is the model class itself.
    annotation = inspect.signature(build_app).parameters["args"].annotation
    assert annotation is ServeSettings and typing.get_type_hints(build_app)["args"] is ServeSettings
    received: list[object] = []

    def spy(args: ServeSettings) -> serve.Application:
        received.append(args)
        return build_app(args)

    spy.__annotations__["args"] = annotation  # a string here: this test module postpones its annotations
    # `serve run pipelines.serve:build_app key=value ...` hands the builder text; a config's args: are typed.
    text = {"model": "models:/m@best", "max_replicas": "3", "mask_threshold": "0.5", "num_gpus": "1"}
    app = call_user_app_builder_with_args_if_necessary(spy, text)
    assert received == [ServeSettings(model="models:/m@best", max_replicas=3, mask_threshold=0.5, num_gpus=1)]
    model = app._bound_deployment.init_args[0]._bound_deployment
    assert model.user_config["mask_threshold"] == 0.5 and model.ray_actor_options["num_gpus"] == 1
    with pytest.raises(pydantic.ValidationError, match="unknown serve args"):
        call_user_app_builder_with_args_if_necessary(build_app, {"model": "m", "max_batch": "8"})


def test_ingress_user_config() -> None:
    limits, token = limits_from_user_config({"max_image_bytes": 10, "auth_token": "t"})
    assert (limits.max_image_bytes, limits.max_image_pixels, token) == (10, RequestLimits.max_image_pixels, "t")
    assert limits_from_user_config({})[1] is None
    with pytest.raises(ValueError, match="unknown"):
        limits_from_user_config({"max_bytes": 10})
    with pytest.raises(ValueError, match="positive"):
        limits_from_user_config({"max_image_pixels": 0})


def test_cluster_serve_config_matches_the_application() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "cluster" / "serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "pipelines.serve:build_app"
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    ServeSettings.model_validate(app["args"])
    call_user_app_builder_with_args_if_necessary(build_app, app["args"])
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {MODEL_DEPLOYMENT, INGRESS_DEPLOYMENT}
    model = deployments[MODEL_DEPLOYMENT]
    settings = BatchSettings.from_user_config(model["user_config"])
    assert settings.max_batch_size <= model["max_ongoing_requests"]
    assert model["ray_actor_options"]["num_gpus"] >= 1
    limits_from_user_config(deployments[INGRESS_DEPLOYMENT]["user_config"])
    for deployment in deployments.values():
        scaling = deployment["autoscaling_config"]
        assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"] and scaling["target_ongoing_requests"] > 0
