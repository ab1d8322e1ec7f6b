"""The wire codec (openpi's msgpack + ndarray encoding) and the observation layouts, in process.

The expected encoding is written out here by hand from the protocol facts (bytes keys
__ndarray__/data/dtype/shape, __npgeneric__), independently of our encoder."""

import msgpack
import numpy as np
import pytest

from flash_rt.errors import InputError
from flash_rt.serving import layouts
from flash_rt.serving.msgpack_numpy import WireError, packb, unpackb

RNG = np.random.default_rng(7)


def _by_hand(array: np.ndarray) -> dict:
    return {b"__ndarray__": True, b"data": array.tobytes(), b"dtype": array.dtype.str, b"shape": list(array.shape)}


@pytest.mark.parametrize("dtype", ["<f4", "<f8", "|u1", "<i8", "<i2", "|b1", "<f2", ">f4"])
@pytest.mark.parametrize("shape", [(3, 5, 2), (7,), (), (0, 4)])
def test_arrays_decode_from_the_openpi_encoding_and_round_trip(dtype, shape):
    array = np.asarray(RNG.standard_normal(shape) * 50).astype(dtype)
    frame = msgpack.packb({"obs": _by_hand(array), "prompt": "go"}, use_bin_type=True)
    decoded = unpackb(frame)
    assert decoded["prompt"] == "go"
    got = decoded["obs"]
    assert got.dtype == np.dtype(dtype) and got.shape == shape
    np.testing.assert_array_equal(got, array)
    assert not got.flags.writeable  # a view of the received frame, like openpi's decoder
    # our encoder writes exactly that map (bytes keys), and it round-trips
    raw = msgpack.unpackb(packb({"obs": array}), raw=False)
    assert raw["obs"][b"__ndarray__"] is True and raw["obs"][b"dtype"] == array.dtype.str
    assert raw["obs"][b"data"] == array.tobytes() and tuple(raw["obs"][b"shape"]) == shape
    np.testing.assert_array_equal(unpackb(packb({"obs": array}))["obs"], array)


def test_non_contiguous_arrays_are_encoded_in_c_order():
    array = RNG.standard_normal((4, 6)).astype(np.float32)[:, ::2]
    np.testing.assert_array_equal(unpackb(packb(array)), array)


@pytest.mark.parametrize("value", [np.float32(1.5), np.int64(-3), np.uint8(200), np.bool_(True)])
def test_numpy_scalars_use_npgeneric(value):
    raw = msgpack.unpackb(packb(value), raw=False)
    assert raw[b"__npgeneric__"] is True and raw[b"dtype"] == value.dtype.str
    got = unpackb(packb(value))
    assert type(got) is type(value) and got == value


@pytest.mark.parametrize("array", [np.zeros(3, np.complex64), np.array([object()], dtype=object),
                                   np.zeros(2, dtype=[("a", "<f4")])])
def test_refused_dtypes_are_not_encoded(array):
    with pytest.raises(WireError, match="refused"):
        packb({"x": array})


@pytest.mark.parametrize("dtype", ["|O", "<c8", "|V8", "f4,i4"])
def test_refused_dtypes_are_not_decoded(dtype):
    frame = msgpack.packb({b"__ndarray__": True, b"data": b"\x00" * 8, b"dtype": dtype, b"shape": [1]})
    with pytest.raises(WireError, match="refused"):
        unpackb(frame)
    with pytest.raises(WireError):
        unpackb(msgpack.packb({b"__npgeneric__": True, b"data": 0, b"dtype": dtype}))


@pytest.mark.parametrize("bad, message", [
    ({b"data": b"\x00" * 6, b"dtype": "<f4", b"shape": [2]}, "needs 8 bytes"),
    ({b"data": b"\x00" * 8, b"dtype": "<f4", b"shape": [-2]}, "non-negative"),
    ({b"data": b"\x00" * 8, b"dtype": "<f4", b"shape": "2"}, "non-negative"),
    ({b"data": "text", b"dtype": "<f4", b"shape": [1]}, "must be bytes"),
    ({b"data": b"\x00" * 4, b"dtype": "float-ish", b"shape": [1]}, "not a numpy dtype"),
    ({b"data": b"\x00" * 4, b"dtype": 4, b"shape": [1]}, "short string"),
])
def test_malformed_arrays_are_wire_errors(bad, message):
    frame = msgpack.packb({"x": {b"__ndarray__": True, **bad}})
    with pytest.raises(WireError, match=message):
        unpackb(frame)


@pytest.mark.parametrize("frame", [b"\xc1", b"\x92\x01", b"\x81\xa1a\x01\x02", b"\x81\x01\x02", b"\xa2\xff\xfe",
                                   b"", b"\x91" * 5000])
def test_frames_that_are_not_msgpack_are_wire_errors(frame):
    with pytest.raises(WireError, match="not valid msgpack"):
        unpackb(frame)
    assert issubclass(WireError, InputError)


def test_extension_types_stay_inert():
    got = unpackb(msgpack.packb({"x": msgpack.ExtType(5, b"payload")}))
    assert got["x"] == msgpack.ExtType(5, b"payload")


# ---------------------------------------------------------------- layouts


def _img(h=20, w=24):
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_libero_layout():
    obs = {"observation/image": _img(), "observation/wrist_image": _img(), "observation/state": RNG.random(8),
           "prompt": "pick", "extra/key": 1}
    got = layouts.to_policy_input(obs)
    assert got.layout is layouts.LIBERO and got.prompt == "pick" and got.layout.action_dim == 7
    np.testing.assert_array_equal(got.images[0], obs["observation/image"])
    np.testing.assert_array_equal(got.images[1], obs["observation/wrist_image"])
    np.testing.assert_allclose(got.state, obs["observation/state"], rtol=1e-6)
    assert got.state.dtype == np.float32 and all(i.flags.writeable for i in got.images)


def test_droid_layout_concatenates_joints_and_gripper():
    obs = {"observation/exterior_image_1_left": _img(), "observation/wrist_image_left": _img(),
           "observation/joint_position": RNG.random(7), "observation/gripper_position": RNG.random(1), "prompt": "p"}
    got = layouts.to_policy_input(obs)
    assert got.layout is layouts.DROID and got.layout.action_dim == 8
    np.testing.assert_allclose(got.state, np.concatenate([obs["observation/joint_position"],
                                                          obs["observation/gripper_position"]]), rtol=1e-6)
    np.testing.assert_array_equal(got.images[0], obs["observation/exterior_image_1_left"])
    # a scalar gripper position (a plain float) is accepted too
    obs["observation/gripper_position"] = 0.25
    assert layouts.to_policy_input(obs).state[-1] == np.float32(0.25)


def test_aloha_layout_is_channels_first_and_ignores_cam_low():
    cams = {c: RNG.integers(0, 256, size=(3, 20, 24), dtype=np.uint8)
            for c in ("cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist")}
    got = layouts.to_policy_input({"images": cams, "state": RNG.random(14), "prompt": "fold"})
    assert got.layout is layouts.ALOHA and len(got.images) == 3
    for image, cam in zip(got.images, ("cam_high", "cam_left_wrist", "cam_right_wrist")):
        np.testing.assert_array_equal(image, cams[cam].transpose(1, 2, 0))
    single = layouts.to_policy_input({"images": {"cam_high": cams["cam_high"]}, "state": RNG.random(14)})
    assert len(single.images) == 1 and single.prompt is None


def test_generic_layouts_and_float_images():
    list_obs = {"images": [_img(), _img()], "state": [0.5, 1.0, -2.0], "prompt": "p"}
    got = layouts.to_policy_input(list_obs)
    assert got.layout.action_dim is None and got.state.tolist() == [0.5, 1.0, -2.0]
    as_float = RNG.random((3, 8, 9))
    got = layouts.to_policy_input({"images": {"image": as_float}})
    assert got.state is None
    np.testing.assert_array_equal(got.images[0], (255 * as_float.transpose(1, 2, 0)).astype(np.uint8))


@pytest.mark.parametrize("mutate, message", [
    (lambda o: o.pop("observation/state"), "missing 'observation/state'"),
    (lambda o: o.pop("observation/wrist_image"), "missing image 'observation/wrist_image'"),
    (lambda o: o.__setitem__("observation/image", "x"), "must be an image array"),
    (lambda o: o.__setitem__("observation/image", _img()[:, :, 0]), r"shape \(H, W, 3\)"),
    (lambda o: o.__setitem__("observation/image", np.zeros((8, 8, 4), np.uint8)), r"shape \(H, W, 3\)"),
    (lambda o: o.__setitem__("observation/image", np.zeros((8, 8, 3), np.int32)), "must be uint8"),
    (lambda o: o.__setitem__("observation/image", np.full((8, 8, 3), 2.0)), "outside"),
    (lambda o: o["observation/state"].__setitem__(2, np.nan), "NaN"),
    (lambda o: o["observation/state"].__setitem__(0, np.inf), "NaN or Inf"),
    (lambda o: o.__setitem__("observation/state", np.zeros((2, 4))), "1-D"),
    (lambda o: o.__setitem__("observation/state", "1,2"), "numeric"),
    (lambda o: o.__setitem__("observation/state", np.array([True, False])), "numeric"),
    (lambda o: o.__setitem__("prompt", 3), "'prompt' must be a string"),
    (lambda o: o.__setitem__("prompt", "x" * 5000), "limit"),
])
def test_bad_libero_observations(mutate, message):
    obs = {"observation/image": _img(), "observation/wrist_image": _img(), "observation/state": RNG.random(8),
           "prompt": "pick"}
    mutate(obs)
    with pytest.raises(InputError, match=message):
        layouts.to_policy_input(obs)


@pytest.mark.parametrize("obs, message", [
    ([1, 2], "must be a msgpack map"),
    ({"camera": 1}, "unrecognised observation layout"),
    ({"images": {"cam_high": np.zeros((3, 4, 4), np.uint8), "cam_top": 1}, "state": [1.0]}, "unknown aloha"),
    ({"images": {"cam_left_wrist": np.zeros((3, 4, 4), np.uint8)}, "state": [1.0]}, "without 'cam_high'"),
    ({"images": {"image": np.zeros((4, 4, 3), np.uint8), "wrist_image_right": np.zeros((4, 4, 3), np.uint8)}},
     "without 'wrist_image'"),
    ({"images": []}, "1 to 3 views"),
    ({"images": "abc"}, "must be a list"),
])
def test_bad_layouts(obs, message):
    with pytest.raises(InputError, match=message):
        layouts.to_policy_input(obs)


def test_view_count_is_checked_against_the_model():
    obs = {"images": [_img(), _img(), _img()], "state": [1.0]}
    with pytest.raises(InputError, match="takes 2 camera view"):
        layouts.to_policy_input(obs, num_views=2)
    assert len(layouts.to_policy_input(obs, num_views=3).images) == 3
