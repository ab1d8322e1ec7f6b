"""Torch side of the loader: safetensors sources (single, sharded, corrupt), the streaming
writer, and every transform and sink checked against an independent computation."""

import json
import os

import pytest

torch = pytest.importorskip("torch")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from flash_rt.errors import CheckpointError, ConfigError  # noqa: E402
from flash_rt.executors.torch_weights import (  # noqa: E402
    Attr,
    Cat,
    DictSource,
    FlatCat,
    FusedGateUp,
    FusedQKV,
    InterleaveQK,
    Mul,
    Quant,
    Reshape,
    SafetensorsSource,
    T,
    TensorList,
    ToBf16,
    ToFp16,
    ToFp32,
    quantize_fp8_e4m3,
    tT,
    write_safetensors,
)
from flash_rt.executors.weight_loader import Item, LayerBlock, ModelWeightSpec, WeightLoader  # noqa: E402


class Target:
    pass


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def random_checkpoint(n_layers=2):
    ck = {"model.embed": rand(10, 6, seed=1, dtype=torch.bfloat16)}
    for i in range(n_layers):
        ck[f"model.layers.{i}.w"] = rand(6, 6, seed=10 + i)
    return ck


SPEC = ModelWeightSpec(
    [
        Item("embed", [ToFp32()], Attr("embed"), dtype="bf16", shape=(10, 6)),
        LayerBlock(2, [Item("layers.{i}.w", [], TensorList("w"))]),
    ]
)


def check_loaded(t, ck):
    assert t.embed.dtype == torch.float32 and torch.equal(t.embed, ck["model.embed"].float())
    assert [torch.equal(a, ck[f"model.layers.{i}.w"]) for i, a in enumerate(t.w)] == [True, True]


# ---------------------------------------------------------------------------------------------
# sources


def test_safetensors_single_file_and_directory(tmp_path):
    ck = random_checkpoint()
    save_file(ck, tmp_path / "model.safetensors")
    for path in (tmp_path / "model.safetensors", tmp_path):
        t = Target()
        src = SafetensorsSource(path, strip_prefix="model.")
        WeightLoader(src, SPEC, t, unused="error").run()
        check_loaded(t, ck)


def write_sharded(tmp_path, ck, n_shards=2):
    names = sorted(ck)
    weight_map = {}
    for s in range(n_shards):
        shard = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: ck[n] for n in names[s::n_shards]}
        save_file(part, tmp_path / shard)
        weight_map.update({n: shard for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return weight_map


def test_safetensors_sharded_with_index(tmp_path):
    ck = random_checkpoint(n_layers=2)
    write_sharded(tmp_path, ck)
    src = SafetensorsSource(tmp_path, strip_prefix="model.")
    assert len(src.files) == 2 and sorted(src.keys()) == sorted(k[len("model.") :] for k in ck)
    t = Target()
    WeightLoader(src, SPEC, t).run()
    check_loaded(t, ck)


def test_directory_without_index_reads_all_safetensors_files(tmp_path):
    ck = random_checkpoint()
    save_file({"model.embed": ck["model.embed"]}, tmp_path / "a.safetensors")
    save_file({k: v for k, v in ck.items() if k != "model.embed"}, tmp_path / "b.safetensors")
    t = Target()
    WeightLoader(SafetensorsSource(tmp_path, strip_prefix="model."), SPEC, t).run()
    check_loaded(t, ck)


def test_stacked_row_read_from_safetensors(tmp_path):
    stacked = rand(3, 4, 5, seed=3)
    save_file({"k": stacked}, tmp_path / "s.safetensors")
    src = SafetensorsSource(tmp_path / "s.safetensors")
    assert src.meta("k[2]").shape == (4, 5)
    assert torch.equal(src.read("k[2]"), stacked[2])
    assert torch.equal(src.read("k[-1, 3]"), stacked[-1, 3]) and src.meta("k[1,0]").shape == (5,)


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        SafetensorsSource(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no .safetensors file"):
        SafetensorsSource(tmp_path)


def test_missing_key_from_safetensors_names_closest(tmp_path):
    save_file({"model.embed_tokens": rand(10, 6, dtype=torch.bfloat16)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as ei:
        WeightLoader(SafetensorsSource(tmp_path, strip_prefix="model."), SPEC, Target()).run()
    msg = str(ei.value)
    assert str(tmp_path) in msg and "missing 'embed'" in msg and "'embed_tokens'" in msg


# corrupt and truncated files: each a CheckpointError naming the file and the problem


def _good_file(tmp_path):
    p = tmp_path / "model.safetensors"
    save_file({"a": rand(64, 64, seed=5), "b": rand(64, seed=6)}, p)
    return p


def test_truncated_file(tmp_path):
    p = _good_file(tmp_path)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated.*\(\d+ bytes? missing\)"):
        SafetensorsSource(p)


def test_cut_inside_header(tmp_path):
    p = _good_file(tmp_path)
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"header length field says \d+ bytes but the file has 40"):
        SafetensorsSource(p)


def test_tiny_file(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="2 bytes, too short"):
        SafetensorsSource(p)


def test_garbage_header(tmp_path):
    p = tmp_path / "x.safetensors"
    body = b"this is not json at all!"
    p.write_bytes(len(body).to_bytes(8, "little") + body + b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"x\.safetensors: the safetensors header is not valid JSON"):
        SafetensorsSource(p)


def test_random_bytes_file(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match=r"x\.safetensors"):
        SafetensorsSource(p)


def test_header_with_inconsistent_offsets(tmp_path):
    p = tmp_path / "x.safetensors"
    hdr = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    p.write_bytes(len(hdr).to_bytes(8, "little") + hdr + b"\0" * 16)
    with pytest.raises(CheckpointError, match="do not match its size"):
        SafetensorsSource(p)


def test_bad_metadata_and_non_object_entries(tmp_path):
    p = tmp_path / "x.safetensors"
    for hdr, why in [
        ({"__metadata__": ["a"]}, "__metadata__ must map strings"),
        ({"a": [1, 2]}, "'a'.*malformed"),
    ]:
        raw = json.dumps(hdr).encode()
        p.write_bytes(len(raw).to_bytes(8, "little") + raw)
        with pytest.raises(CheckpointError, match=why):
            SafetensorsSource(p)


def test_fuzzed_files_give_checkpoint_errors_only(tmp_path):
    """Random cuts and byte flips in the header: a clean load or a CheckpointError, nothing else."""
    import random

    good = _good_file(tmp_path).read_bytes()
    n_header = 8 + int.from_bytes(good[:8], "little")
    r = random.Random(0)
    p = tmp_path / "fuzz.safetensors"
    outcomes = set()
    for trial in range(150):
        data = bytearray(good)
        if trial % 3 == 0:
            data = data[: r.randrange(len(data))]
        else:
            for _ in range(r.randint(1, 4)):
                data[r.randrange(n_header)] = r.randrange(256)
        p.write_bytes(bytes(data))
        try:
            src = SafetensorsSource(p)
            for k in src.keys():
                src.read(k)
            outcomes.add("ok")
        except CheckpointError as e:
            assert "fuzz.safetensors" in str(e)
            outcomes.add("error")
    assert outcomes == {"ok", "error"}


def test_index_naming_a_missing_shard(tmp_path):
    write_sharded(tmp_path, random_checkpoint())
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(
        CheckpointError, match=r"index\.json names 1 shard.*model-00002-of-00002\.safetensors"
    ):
        SafetensorsSource(tmp_path)


def test_index_not_json_or_inconsistent(tmp_path):
    weight_map = write_sharded(tmp_path, random_checkpoint())
    idx = tmp_path / "model.safetensors.index.json"
    idx.write_text("{ nope")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        SafetensorsSource(tmp_path)
    wrong = dict(weight_map)
    k = sorted(wrong)[0]
    wrong[k] = (
        "model-00002-of-00002.safetensors"
        if wrong[k].startswith("model-00001")
        else "model-00001-of-00002.safetensors"
    )
    idx.write_text(json.dumps({"weight_map": wrong}))
    with pytest.raises(CheckpointError, match="shards that do not hold them"):
        SafetensorsSource(tmp_path)


def test_duplicate_key_after_prefix_strip(tmp_path):
    save_file({"model.a": rand(2), "a": rand(2)}, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="appears twice"):
        SafetensorsSource(tmp_path / "x.safetensors", strip_prefix="model.")


# ---------------------------------------------------------------------------------------------
# writer


def test_writer_round_trips_through_safetensors_reader(tmp_path):
    tensors = {
        "w_bf16": rand(7, 5, seed=1, dtype=torch.bfloat16),
        "w_f32": rand(3, 3, 2, seed=2),
        "w_f16": rand(9, seed=3, dtype=torch.float16),
        "i64": torch.randint(-5, 5, (4,), generator=torch.Generator().manual_seed(4)),
        "mask": torch.rand(6, generator=torch.Generator().manual_seed(5)) > 0.5,
        "fp8": rand(4, 4, seed=6).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 3),
        "strided": rand(5, 4, seed=7).t(),  # non-contiguous input
    }
    p = tmp_path / "out.safetensors"
    write_safetensors(p, tensors, metadata={"format": "pt", "note": "random"})
    back = load_file(p)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert torch.equal(back[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
    with safe_open(p, "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "random"}
    assert os.listdir(tmp_path) == ["out.safetensors"]  # temp file renamed away


def test_writer_streams_a_generator_with_a_layout(tmp_path):
    layout = [(f"layers.{i}.w", (32, 16), torch.bfloat16) for i in range(4)]
    made = []

    def gen():
        for i, (name, shape, dt) in enumerate(layout):
            t = rand(*shape, seed=100 + i, dtype=dt)
            made.append(t.clone())
            yield name, t

    p = tmp_path / "g.safetensors"
    write_safetensors(p, gen(), layout=layout)
    back = load_file(p)
    assert all(torch.equal(back[f"layers.{i}.w"], made[i]) for i in range(4))
    # and our own source reads it
    assert torch.equal(SafetensorsSource(p).read("layers.3.w"), made[3])


def test_writer_spools_an_iterable_without_layout(tmp_path):
    items = [("b", rand(3, seed=1)), ("a", rand(2, 2, seed=2, dtype=torch.bfloat16))]
    p = tmp_path / "s.safetensors"
    write_safetensors(p, iter(items))
    back = load_file(p)
    assert torch.equal(back["b"], items[0][1]) and torch.equal(back["a"], items[1][1])


def test_writer_rejects_layout_mismatch_and_leaves_no_file(tmp_path):
    p = tmp_path / "bad.safetensors"
    with pytest.raises(ConfigError, match="layout announced 'a'"):
        write_safetensors(p, iter([("a", rand(3))]), layout=[("a", (4,), torch.float32)])
    with pytest.raises(ConfigError, match="ended before 'b'"):
        write_safetensors(p, iter([("a", rand(3))]), layout=[("a", (3,), "F32"), ("b", (3,), "F32")])
    with pytest.raises(ConfigError, match="'c' is not in the layout"):
        write_safetensors(p, iter([("a", rand(3)), ("c", rand(1))]), layout=[("a", (3,), "F32")])
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# transforms and sinks (expected values computed independently)


def load_one(ck, item, target=None, **kw):
    t = target or Target()
    WeightLoader(DictSource(ck), ModelWeightSpec([item]), t, unused="ignore", **kw).run()
    return t


def test_cat_fused_qkv_fused_gate_up():
    q, k, v = rand(8, 4, seed=1), rand(2, 4, seed=2), rand(2, 4, seed=3)
    ck = {"q": q, "k": k, "v": v, "g": rand(6, 4, seed=4), "u": rand(6, 4, seed=5)}
    t = load_one(ck, Item(["q", "k", "v"], [FusedQKV()], Attr("qkv")))
    assert t.qkv.shape == (12, 4) and torch.equal(t.qkv[:8], q) and torch.equal(t.qkv[8:10], k)
    assert torch.equal(t.qkv[10:], v)
    t = load_one(ck, Item(["g", "u"], [FusedGateUp()], Attr("gu")))
    assert torch.equal(t.gu[:6], ck["g"]) and torch.equal(t.gu[6:], ck["u"])
    t = load_one(ck, Item(["g", "u"], [Cat(dim=1)], Attr("gu1")))
    assert t.gu1.shape == (6, 8) and torch.equal(t.gu1[:, 4:], ck["u"])
    with pytest.raises(CheckpointError, match="FusedQKV expects 3 tensors"):
        load_one(ck, Item(["q", "k"], [FusedQKV()], Attr("x")))


def test_dtype_casts_and_transposes():
    w = rand(3, 5, seed=9)
    ck = {"w": w}
    assert load_one(ck, Item("w", [ToFp16()], Attr("x"))).x.dtype == torch.float16
    assert torch.equal(load_one(ck, Item("w", [ToFp16()], Attr("x"))).x, w.half())
    assert torch.equal(load_one(ck, Item("w", [ToBf16()], Attr("x"))).x, w.bfloat16())
    assert torch.equal(load_one({"w": w.half()}, Item("w", [ToFp32()], Attr("x"))).x, w.half().float())
    x = load_one(ck, Item("w", [T()], Attr("x"))).x
    assert x.shape == (5, 3) and torch.equal(x, w.t())
    x = load_one(ck, Item("w", [tT()], Attr("x"))).x
    assert x.is_contiguous() and torch.equal(x, w.t())
    x = load_one(ck, Item("w", [Reshape((15,))], Attr("x"))).x
    assert torch.equal(x, w.flatten())


def interleave_reference(w, head_dim):
    """Row-by-row: new row 2j <- old row j, new row 2j+1 <- old row j + head_dim/2, per head."""
    out = torch.empty_like(w)
    half = head_dim // 2
    for h in range(w.shape[0] // head_dim):
        base = h * head_dim
        for j in range(half):
            out[base + 2 * j] = w[base + j]
            out[base + 2 * j + 1] = w[base + half + j]
    return out


def test_interleave_qk_matches_row_by_row_reference():
    q, k, v = rand(3 * 8, 5, seed=1), rand(8, 5, seed=2), rand(8, 5, seed=3)
    ck = {"q": q, "k": k, "v": v, "qb": rand(24, seed=4)}
    t = load_one(ck, Item(["q", "k", "v"], [InterleaveQK(8, on=(0, 1)), FusedQKV()], Attr("qkv")))
    expect = torch.cat([interleave_reference(q, 8), interleave_reference(k, 8), v])
    assert torch.equal(t.qkv, expect)
    t = load_one(ck, Item("qb", [InterleaveQK("hd")], Attr("b")), params={"hd": 8})
    assert torch.equal(t.b, interleave_reference(ck["qb"][:, None], 8)[:, 0])
    # transposed layout: heads along the last dim
    t = load_one(ck, Item("q", [tT(), InterleaveQK(8, dim=-1)], Attr("qt")))
    assert torch.equal(t.qt, interleave_reference(q, 8).t())
    with pytest.raises(CheckpointError, match="not a multiple of head_dim=7"):
        load_one(ck, Item("q", [InterleaveQK(7)], Attr("x")))


def fp8_reference(w):
    amax = w.float().abs().max().item()
    scale = amax / 448.0
    return (w.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def test_quant_fp8_records_scales_in_list_and_attr():
    ck = {f"l.{i}.w": rand(16, 8, seed=i) * (i + 1) for i in range(3)}
    spec = ModelWeightSpec(
        [
            LayerBlock(
                3, [Item("l.{i}.w", [Quant(scale_into="_enc_w_scales", scale_attr="s{i}")], TensorList("q"))]
            )
        ]
    )
    t = Target()
    WeightLoader(DictSource(ck), spec, t).run()
    for i in range(3):
        q_ref, s_ref = fp8_reference(ck[f"l.{i}.w"])
        assert t.q[i].dtype == torch.float8_e4m3fn
        assert torch.equal(t.q[i].view(torch.uint8), q_ref.view(torch.uint8))
        assert t._enc_w_scales[i] == s_ref == getattr(t, f"s{i}")
        # dequantised within fp8 precision (3 mantissa bits: rel. step 1/8 -> half-step error 1/16)
        err = (t.q[i].float() * s_ref - ck[f"l.{i}.w"]).abs()
        assert (err <= ck[f"l.{i}.w"].abs() / 16 + s_ref * 2**-9).all()
    assert t._enc_w_scales[2] > t._enc_w_scales[0]


def test_quant_edge_cases():
    q, s = quantize_fp8_e4m3(torch.zeros(4))
    assert s == 1.0 and torch.equal(q.float(), torch.zeros(4))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_fp8_e4m3(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ConfigError, match="scale_into"):
        Quant()


def test_mul_constant_and_norm_fold():
    w = rand(6, 4, seed=1, dtype=torch.bfloat16)
    n = rand(4, seed=2)
    ck = {"l.0.w": w, "l.0.norm": n}
    t = load_one(ck, Item("l.0.w", [Mul(0.5)], Attr("x")))
    assert t.x.dtype == torch.bfloat16 and torch.equal(t.x, (w.float() * 0.5).bfloat16())
    loader_t = Target()
    spec = ModelWeightSpec(
        [LayerBlock(1, [Item("l.{i}.w", [Mul(2.0, key="l.{i}.norm", plus_one=True)], Attr("y"))])]
    )
    loader = WeightLoader(DictSource(ck), spec, loader_t)
    loader.run()
    expect = (w.float() * 2.0 * (1.0 + n)[None, :]).bfloat16()
    assert torch.equal(loader_t.y, expect)
    assert loader.unused_keys() == []  # the folded norm counts as used
    # missing fold key is caught before loading
    with pytest.raises(CheckpointError, match="missing 'l.0.nrm'"):
        load_one(ck, Item("l.0.w", [Mul(key="l.0.nrm")], Attr("y")))
    with pytest.raises(CheckpointError, match="a vector of 6"):
        load_one(ck, Item("l.0.w", [Mul(key="l.0.norm", dim=0)], Attr("y")))


def test_flatcat_concatenates_with_offsets_and_alignment():
    ck = {f"p{i}": rand(i + 2, 3, seed=i) for i in range(3)}
    spec = ModelWeightSpec([LayerBlock(3, [Item("p{i}", [], FlatCat("flat", align=4))])])
    t = Target()
    WeightLoader(DictSource(ck), spec, t).run()
    assert t.flat_offsets == [(0, (2, 3)), (8, (3, 3)), (20, (4, 3))]
    assert t.flat.shape == (32,)
    for (off, shape), i in zip(t.flat_offsets, range(3), strict=True):
        assert torch.equal(t.flat[off : off + ck[f"p{i}"].numel()].reshape(shape), ck[f"p{i}"])
    # a second run starts a fresh buffer (no state leaks between runs)
    WeightLoader(DictSource(ck), spec, t).run()
    assert t.flat.shape == (32,)


def test_flatcat_rejects_mixed_dtypes():
    ck = {"a": rand(2), "b": rand(2, dtype=torch.float16)}
    with pytest.raises(CheckpointError, match="cast first"):
        load_one(ck, Item(["a", "b"], [], FlatCat("f")))


def test_tensorlist_refuses_non_list_attribute():
    t = Target()
    t.q = 5
    with pytest.raises(CheckpointError, match="expected a list"):
        load_one({"a": rand(2)}, Item("a", [], TensorList("q")), target=t)


def test_end_to_end_written_sharded_checkpoint(tmp_path):
    """write_safetensors -> sharded dir -> spec with fused + quantised layers."""
    hidden, n_layers = 16, 3
    ck = {}
    for i in range(n_layers):
        for proj, rows in (("q", 16), ("k", 8), ("v", 8)):
            ck[f"model.layers.{i}.{proj}.weight"] = rand(
                rows, hidden, seed=10 * i + len(proj) + rows, dtype=torch.bfloat16
            )
    names = sorted(ck)
    shard_a = {n: ck[n] for n in names[::2]}
    shard_b = {n: ck[n] for n in names[1::2]}
    write_safetensors(tmp_path / "a.safetensors", shard_a)
    write_safetensors(
        tmp_path / "b.safetensors",
        iter(shard_b.items()),
        layout=[(n, t.shape, t.dtype) for n, t in shard_b.items()],
    )
    wm = {**{n: "a.safetensors" for n in shard_a}, **{n: "b.safetensors" for n in shard_b}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    spec = ModelWeightSpec(
        [
            LayerBlock(
                "n",
                [
                    Item(
                        ["{L}.q.weight", "{L}.k.weight", "{L}.v.weight"],
                        [ToFp32(), InterleaveQK(4, on=(0, 1)), FusedQKV(), tT(), Quant("_qkv_scales")],
                        TensorList("qkv_w"),
                        shape=[(16, "hidden"), (8, "hidden"), (8, "hidden")],
                        dtype="bf16",
                    )
                ],
                params={"L": "layers.{i}"},
            )
        ],
        params={"n": n_layers, "hidden": hidden},
    )
    t = Target()
    with SafetensorsSource(tmp_path, strip_prefix="model.") as src:
        WeightLoader(src, spec, t, unused="error").run()
    for i in range(n_layers):
        q, k, v = (ck[f"model.layers.{i}.{p}.weight"].float() for p in "qkv")
        fused = torch.cat([interleave_reference(q, 4), interleave_reference(k, 4), v]).t().contiguous()
        q_ref, s_ref = fp8_reference(fused)
        assert t._qkv_scales[i] == s_ref
        assert torch.equal(t.qkv_w[i].view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssAnon from /proc")
def test_large_checkpoint_is_streamed_tensor_by_tensor(tmp_path):
    """4 x 64 MiB tensors (a sparse file: no disk used) cast to fp16 one at a time: anonymous
    memory grows by about one tensor, never by the checkpoint."""
    from flash_rt.executors.weight_loader import Sink

    def anon_mib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("RssAnon:"))

    n, numel = 4, 16 * 1024 * 1024
    hdr = {
        f"t{i}": {"dtype": "F32", "shape": [numel], "data_offsets": [i * numel * 4, (i + 1) * numel * 4]}
        for i in range(n)
    }
    raw = json.dumps(hdr).encode()
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + n * numel * 4)

    class Probe(Sink):  # looks at each tensor, keeps only a number
        def store(self, value, ctx):
            assert value.dtype == torch.float16 and value.numel() == numel
            ctx.target.setdefault("anon", []).append(anon_mib())

    base = anon_mib()
    spec = ModelWeightSpec([LayerBlock(n, [Item("t{i}", [ToFp16()], Probe())])])
    out = WeightLoader(SafetensorsSource(path), spec).load()
    growth = max(out["anon"]) - base
    assert len(out["anon"]) == n and growth < 90, (
        f"anonymous memory grew {growth:.0f} MiB (all fp16 copies: 128 MiB)"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_safetensors_source_on_cuda_matches_cpu(tmp_path):
    ck = {
        f"layers.{i}.{p}": rand(32, 16, seed=10 * i + j, dtype=torch.bfloat16)
        for i in range(2)
        for j, p in enumerate("qkv")
    }
    write_safetensors(tmp_path / "model.safetensors", ck)
    spec = ModelWeightSpec(
        [
            LayerBlock(
                2,
                [
                    Item(
                        ["layers.{i}.q", "layers.{i}.k", "layers.{i}.v"],
                        [ToFp32(), InterleaveQK(8, on=(0, 1)), FusedQKV(), tT(), Quant("_s")],
                        TensorList("qkv"),
                    ),
                    Item("layers.{i}.q", [ToFp16()], FlatCat("flat", align=8)),
                ],
            )
        ]
    )
    on_cpu = WeightLoader(SafetensorsSource(tmp_path), spec).load()
    on_gpu = WeightLoader(SafetensorsSource(tmp_path, device="cuda:0"), spec).load()
    assert on_gpu["qkv"][0].is_cuda and on_gpu["flat"].is_cuda
    assert on_gpu["_s"] == on_cpu["_s"]
    for a, b in zip(on_gpu["qkv"], on_cpu["qkv"], strict=True):
        assert torch.equal(a.cpu().view(torch.uint8), b.view(torch.uint8))
    assert (
        torch.equal(on_gpu["flat"].cpu(), on_cpu["flat"]) and on_gpu["flat_offsets"] == on_cpu["flat_offsets"]
    )


def test_written_checkpoint_has_umask_mode(tmp_path):
    import os

    import torch

    from flash_rt.executors.torch_weights import write_safetensors

    umask = os.umask(0o022)
    try:
        path = tmp_path / "m.safetensors"
        write_safetensors(path, {"w": torch.randn(3, 4)})
        assert (path.stat().st_mode & 0o777) == 0o644
    finally:
        os.umask(umask)
