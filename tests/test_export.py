"""`jakiro export --format vllm-eagle`: the tensors and config vLLM's EAGLE loader reads, what the
exported layer computes, the plugin's import and entry point, and the errors.

The layouts below are recorded from vLLM 0.32's loaders (scripts/check_vllm.sh installs that
version): ``vllm/model_executor/models/llama_eagle.py`` (``EagleLlamaForCausalLM``: the
checkpoint's names get a ``model.`` prefix; q/k/v and gate/up are stacked into ``qkv_proj`` and
``gate_up_proj``; ``fc`` is a bias-free ``[H, 2H]`` linear over ``[embed; hidden]``; layer 0's
``input_layernorm`` is an ``nn.Identity``, so it has no weight; there is no final norm; the
embedding and the LM head are the target's when the checkpoint has none) and jakiro's own
``jakiro/vllm_model.py``. The last test builds both through the installed vLLM's model loader
and is skipped where vLLM is not importable (it runs in scripts/check_vllm.sh's venv).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

import jakiro
from jakiro import cli, export
from jakiro.draft import DraftConfig, JakiroDraft
from jakiro.pretrained import resolve_target, shipped_draft
from jakiro.testing import make_tiny_target

ROOT = Path(__file__).resolve().parents[1]


def vllm_eagle_llama_keys(h, heads, kv_heads, head_dim, inter, qkv_bias=False):
    """What vLLM 0.32's EagleLlamaForCausalLM.load_weights accepts and needs (all of it)."""
    keys = {"fc.weight": (h, 2 * h),
            "layers.0.self_attn.q_proj.weight": (heads * head_dim, h),
            "layers.0.self_attn.k_proj.weight": (kv_heads * head_dim, h),
            "layers.0.self_attn.v_proj.weight": (kv_heads * head_dim, h),
            "layers.0.self_attn.o_proj.weight": (h, heads * head_dim),
            "layers.0.post_attention_layernorm.weight": (h,),
            "layers.0.mlp.gate_proj.weight": (inter, h),
            "layers.0.mlp.up_proj.weight": (inter, h),
            "layers.0.mlp.down_proj.weight": (h, inter)}
    if qkv_bias:
        keys.update({"layers.0.self_attn.q_proj.bias": (heads * head_dim,),
                     "layers.0.self_attn.k_proj.bias": (kv_heads * head_dim,),
                     "layers.0.self_attn.v_proj.bias": (kv_heads * head_dim,)})
    return keys


# Names vLLM's EAGLE Llama loader has no parameter for: an export holding one fails to load.
VLLM_EAGLE_LLAMA_ABSENT = ("fc.bias", "layers.0.input_layernorm.weight", "norm.weight", "lm_head.weight",
                           "embed_tokens.weight")


def jakiro_plugin_keys(h, heads, kv_heads, head_dim, inter, experts, fc_bias=True):
    """What jakiro/vllm_model.py's EagleJakiroForCausalLM.load_weights accepts and needs."""
    keys = {name: shape for name, shape in vllm_eagle_llama_keys(h, heads, kv_heads, head_dim, inter).items()
            if ".mlp." not in name}
    keys.update({"layers.0.mlp.w_gate_up": (experts, 2 * inter, h), "layers.0.mlp.w_down": (experts, h, inter)})
    if experts > 1:
        keys["layers.0.mlp.router.weight"] = (experts, h)
    if fc_bias:
        keys["fc.bias"] = (h,)
    return keys


def shapes(folder):
    return {name: tuple(t.shape) for name, t in load_file(str(Path(folder) / "model.safetensors")).items()}


def run_export(*argv):
    return cli.main(["export", "--format", "vllm-eagle", *map(str, argv)])


@pytest.fixture(scope="module")
def smollm2():
    return json.loads((resolve_target() / "config.json").read_text())


# ------------------------------------------------------------------ the shipped drafts, layout
def test_shipped_eagle2_in_vllm_own_layout(tmp_path, smollm2, capsys):
    out = tmp_path / "eagle2"
    assert run_export("eagle2", out, "--arch", "vllm", "--drop-fc-bias") == 0
    assert "fc's bias was dropped" in capsys.readouterr().out
    c = json.loads((out / "config.json").read_text())
    assert shapes(out) == vllm_eagle_llama_keys(576, 9, 3, 64, 1536)
    assert not set(VLLM_EAGLE_LLAMA_ABSENT) & set(shapes(out))
    assert c["architectures"] == ["EagleLlamaForCausalLM"] and c["model_type"] == "llama"
    assert c["num_hidden_layers"] == 1 and c["intermediate_size"] == 1536 and c["hidden_act"] == "silu"
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                "max_position_embeddings", "rope_parameters", "bos_token_id", "eos_token_id"):
        assert c[key] == smollm2[key], key
    assert c["rms_norm_eps"] == pytest.approx(smollm2["rms_norm_eps"])
    assert c["attention_bias"] is False and c["qkv_bias"] is False and c["mlp_bias"] is False
    assert c["tie_word_embeddings"] is False and c["jakiro_export"]["fc_bias_dropped"] is True
    assert not any(key.startswith("jakiro_num") for key in c)     # nothing vLLM could read as a fused MoE
    # The values: fc as is (embedding half first, as jakiro's), gate rows then up rows, the norm.
    draft, exported = load_file(str(shipped_draft("eagle2") / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert torch.equal(exported["fc.weight"], draft["fc.weight"])
    assert torch.equal(exported["layers.0.mlp.gate_proj.weight"], draft["w_gate_up"][0, :1536])
    assert torch.equal(exported["layers.0.mlp.up_proj.weight"], draft["w_gate_up"][0, 1536:])
    assert torch.equal(exported["layers.0.mlp.down_proj.weight"], draft["w_down"][0])
    assert torch.equal(exported["layers.0.post_attention_layernorm.weight"], draft["post_norm"])


@pytest.mark.parametrize("kind, experts, inter", [("jakiro", 2, 576), ("eagle2", 1, 1536)])
def test_shipped_drafts_in_the_plugin_layout(tmp_path, kind, experts, inter, capsys):
    out = tmp_path / kind
    assert run_export(kind, out) == 0          # auto: the fc bias (and the MoE) need the plugin's class
    printed = capsys.readouterr().out
    assert "EagleJakiroForCausalLM" in printed and "plugin" in printed
    assert ("contrastive head was not exported" in printed) == (kind == "jakiro")
    assert shapes(out) == jakiro_plugin_keys(576, 9, 3, 64, inter, experts)
    c = json.loads((out / "config.json").read_text())
    assert c["architectures"] == [export.JAKIRO_ARCH] and c["intermediate_size"] == inter
    assert (c["jakiro_num_experts"], c["jakiro_experts_per_token"], c["jakiro_fc_bias"]) == (experts, experts, True)
    assert "num_experts" not in c
    draft, exported = load_file(str(shipped_draft(kind) / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert torch.equal(exported["fc.bias"], draft["fc.bias"])
    assert torch.equal(exported["layers.0.mlp.w_gate_up"], draft["w_gate_up"])
    if experts > 1:   # the mixture head's logits only: the contrastive rows are left out
        assert torch.equal(exported["layers.0.mlp.router.weight"], draft["router.weight"][:experts])


def test_auto_picks_vllm_own_class_when_it_is_exact(tmp_path):
    target = make_tiny_target("llama", hidden=64, heads=2, kv_heads=1, head_dim=32, intermediate=96)
    target.save_pretrained(tmp_path / "target")
    draft = JakiroDraft.from_target(target, eagle2=True, fc_bias=False, feature_layers=None)
    draft.save_pretrained(tmp_path / "draft")
    result = export.export_vllm_eagle(tmp_path / "draft", tmp_path / "out", target=tmp_path / "target")
    assert result.architecture == "EagleLlamaForCausalLM" and not result.needs_plugin and not result.notes
    assert result.tensors == vllm_eagle_llama_keys(64, 2, 1, 32, 96)


def test_draft_fields_follow_draft_config():
    """The exporter's field list and defaults are DraftConfig's (a new field must be taught to it)."""
    import dataclasses
    fields = {f.name: f.default for f in dataclasses.fields(DraftConfig)}
    assert export.DRAFT_FIELDS == {name: (None if default is dataclasses.MISSING else default)
                                   for name, default in fields.items()}


# ------------------------------------------------------------------ what the exported layer computes
def vllm_style_forward(config: dict, t: dict, embed: torch.Tensor, hidden, ids, positions):
    """The exported draft as vLLM's EAGLE layer runs it (llama_eagle.py / jakiro/vllm_model.py),
    from the exported config and tensors alone: fc over [embed; hidden], attention (no input
    norm, neox RoPE of the config's default rope_theta, causal, scale head_dim ** -0.5),
    residual, post_attention_layernorm, the MLP, residual; no final norm."""
    d, heads, kv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    p = "layers.0."
    z = F.linear(torch.cat((embed[ids], hidden), -1), t["fc.weight"], t.get("fc.bias"))
    length = z.shape[0]
    q = F.linear(z, t[p + "self_attn.q_proj.weight"], t.get(p + "self_attn.q_proj.bias")).view(length, heads, d)
    k = F.linear(z, t[p + "self_attn.k_proj.weight"], t.get(p + "self_attn.k_proj.bias")).view(length, kv, d)
    v = F.linear(z, t[p + "self_attn.v_proj.weight"], t.get(p + "self_attn.v_proj.bias")).view(length, kv, d)
    rope = config["rope_parameters"]
    assert rope["rope_type"] == "default"
    inv_freq = 1.0 / rope["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[:, None] * inv_freq[None]
    cos, sin = torch.cat((angles.cos(), angles.cos()), -1).float(), torch.cat((angles.sin(), angles.sin()), -1).float()

    def rotate(x):
        x1, x2 = x[..., :d // 2], x[..., d // 2:]
        return x * cos[:, None] + torch.cat((-x2, x1), -1) * sin[:, None]
    q, k = rotate(q), rotate(k)
    k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * d ** -0.5
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(length, heads * d)
    h = z + F.linear(attn, t[p + "self_attn.o_proj.weight"])
    u = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + config["rms_norm_eps"]) * t[p + "post_attention_layernorm.weight"]
    act = F.silu if config["hidden_act"] == "silu" else (lambda x: F.gelu(x, approximate="tanh"))
    if p + "mlp.gate_proj.weight" in t:
        mlp = F.linear(act(F.linear(u, t[p + "mlp.gate_proj.weight"])) * F.linear(u, t[p + "mlp.up_proj.weight"]),
                       t[p + "mlp.down_proj.weight"])
    else:
        w_gate_up, w_down = t[p + "mlp.w_gate_up"], t[p + "mlp.w_down"]
        experts, inter = w_gate_up.shape[0], w_down.shape[2]
        if experts == 1:
            coeff = torch.ones(length, 1)
        else:
            top = F.linear(u, t[p + "mlp.router.weight"]).topk(config["jakiro_experts_per_token"], -1)
            coeff = torch.zeros(length, experts).scatter(1, top.indices, top.values.softmax(-1))
        mlp = 0
        for e in range(experts):
            gate, up = F.linear(u, w_gate_up[e]).split(inter, -1)
            mlp = mlp + coeff[:, e:e + 1] * F.linear(act(gate) * up, w_down[e])
    return h + mlp


@pytest.mark.parametrize("case", ["jakiro", "jakiro-top1-of-3", "eagle2", "eagle2-vllm-class", "qkv-bias",
                                  "qkv-bias-vllm-class", "geglu"])
def test_exported_layer_computes_the_draft(tmp_path, case):
    """From the exported files alone, the layer vLLM runs gives jakiro's mixture feature."""
    act = {"hidden_act": "gelu_pytorch_tanh"} if case == "geglu" else {}
    target = make_tiny_target("llama", hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=96, seed=1, **act)
    target.save_pretrained(tmp_path / "target")
    options = {"jakiro": {}, "jakiro-top1-of-3": dict(num_experts=3, experts_per_token=1),
               "qkv-bias": dict(attention_bias=True), "geglu": {}}.get(case)
    torch.manual_seed(2)
    if case.startswith("eagle2") or case == "qkv-bias-vllm-class":
        draft = JakiroDraft.from_target(target, eagle2=True, fc_bias=case == "eagle2",
                                        attention_bias=case == "qkv-bias-vllm-class", feature_layers=None)
    else:
        draft = JakiroDraft.from_target(target, feature_layers=None, **options)
    with torch.no_grad():            # trained-looking parameters: no zero biases, no unit norm
        for param in draft.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    draft.save_pretrained(tmp_path / "draft")
    result = export.export_vllm_eagle(tmp_path / "draft", tmp_path / "out", target=tmp_path / "target")
    vllm_class = case.endswith("vllm-class")      # auto picks vLLM's own class for these (no fc bias, no MoE)
    assert result.architecture == ("EagleLlamaForCausalLM" if vllm_class else export.JAKIRO_ARCH)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    length = 7
    hidden = torch.randn(length, 64)
    ids = torch.randint(0, 256, (length,))
    positions = torch.arange(3, 3 + length)
    with torch.no_grad():
        want = draft(hidden[None], ids[None], positions[None]).mixture[0]
        got = vllm_style_forward(config, tensors, target.get_input_embeddings().weight.detach(), hidden, ids, positions)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rope_and_context_come_from_the_target(tmp_path):
    target = make_tiny_target("llama3", hidden=64, heads=2, kv_heads=1, head_dim=32, max_positions=512)
    target.save_pretrained(tmp_path / "target")
    JakiroDraft.from_target(target, feature_layers=None).save_pretrained(tmp_path / "draft")
    result = export.export_vllm_eagle(tmp_path / "draft", tmp_path / "out", target=tmp_path / "target")
    rope = result.config["rope_parameters"]
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0 and rope["factor"] == 8.0
    assert rope["original_max_position_embeddings"] == 16 and result.config["max_position_embeddings"] == 512


# ------------------------------------------------------------------ the plugin
def test_plugin_module_imports_without_vllm():
    """The entry point's module imports neither vLLM nor the model module; register() is the one
    place that needs vLLM. jakiro.export needs no vLLM either, nor the draft and cache modules
    (only `import jakiro` itself loads the compiled ops)."""
    code = ("import sys; import jakiro.vllm_plugin as p, jakiro.export as e; "
            "bad = sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.') or m in "
            "('jakiro.vllm_model', 'jakiro.draft', 'jakiro.kv_cache')); "
            "assert not bad, bad; assert p.ARCHITECTURE == e.JAKIRO_ARCH; print(p.MODEL_CLASS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "jakiro.vllm_model:EagleJakiroForCausalLM"


def test_plugin_entry_point_in_the_package_metadata():
    tomllib = pytest.importorskip("tomllib")       # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["vllm.general_plugins"] == {"jakiro": "jakiro.vllm_plugin:register"}
    import jakiro.vllm_plugin
    assert callable(jakiro.vllm_plugin.register)
    model_module = ROOT / "jakiro" / "vllm_model.py"
    assert f"class {jakiro.vllm_plugin.ARCHITECTURE}(" in model_module.read_text()


# ------------------------------------------------------------------ errors
def fails(argv, capsys, match):
    with pytest.raises(SystemExit) as exit_info:
        run_export(*argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jakiro export: error: ") and match in err[0], err
    return err[0]


def test_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    fails([tmp_path / "missing", tmp_path / "o"], capsys, "is not a folder")
    fails([tmp_path / "empty", tmp_path / "o"], capsys, "is not a jakiro draft folder: it has no config.json")
    (tmp_path / "exists").mkdir()
    fails(["eagle2", tmp_path / "exists"], capsys, "exists (pass --force")
    (tmp_path / "file").write_text("x")
    fails(["eagle2", tmp_path / "file", "--force"], capsys, "exists and is not a folder")
    fails(["jakiro", tmp_path / "o", "--arch", "vllm"], capsys, "its MLP is a 2-expert MoE")
    fails(["eagle2", tmp_path / "o", "--arch", "vllm"], capsys, "fc has a bias")
    fails(["eagle2", tmp_path / "o", "--arch", "jakiro", "--drop-fc-bias"], capsys, "--drop-fc-bias applies")
    with pytest.raises(SystemExit) as exit_info:   # argparse: an unknown format
        run_export("eagle2", tmp_path / "o", "--format", "onnx")
    assert exit_info.value.code == 2
    capsys.readouterr()
    assert not (tmp_path / "o").exists()           # nothing written by a refused export
    # --force replaces an export
    assert run_export("eagle2", tmp_path / "exists", "--force") == 0
    assert shapes(tmp_path / "exists")["fc.bias"] == (576,)


def test_bad_draft_files(tmp_path, capsys):
    draft = tmp_path / "draft"
    draft.mkdir()
    config = json.loads((shipped_draft("jakiro") / "config.json").read_text())
    (draft / "config.json").write_text("{not json")
    (draft / "model.safetensors").write_bytes(b"garbage")
    fails([draft, tmp_path / "o"], capsys, "config.json is not readable JSON")
    (draft / "config.json").write_text(json.dumps({**config, "new_field": 1}))
    fails([draft, tmp_path / "o"], capsys, "fields this exporter does not know (new_field)")
    (draft / "config.json").write_text(json.dumps(config))
    fails([draft, tmp_path / "o"], capsys, "model.safetensors is not a readable safetensors file")
    eagle2 = load_file(str(shipped_draft("eagle2") / "model.safetensors"))
    from safetensors.torch import save_file
    save_file(eagle2, str(draft / "model.safetensors"))
    fails([draft, tmp_path / "o"], capsys, "does not hold this draft's weights: missing router.weight")


def test_drafts_that_cannot_be_expressed(tmp_path, capsys):
    gemma = make_tiny_target("gemma3", hidden=64, heads=2, kv_heads=1, head_dim=32)
    gemma.save_pretrained(tmp_path / "gemma")
    JakiroDraft.from_target(gemma, feature_layers=None).save_pretrained(tmp_path / "gemma-draft")
    llama = make_tiny_target("llama", hidden=64, heads=2, kv_heads=1, head_dim=32)
    llama.save_pretrained(tmp_path / "llama")
    geglu = make_tiny_target("llama", hidden=64, heads=2, kv_heads=1, head_dim=32, hidden_act="gelu_pytorch_tanh")
    geglu.save_pretrained(tmp_path / "geglu")
    JakiroDraft.from_target(geglu, eagle2=True, fc_bias=False, feature_layers=None).save_pretrained(
        tmp_path / "geglu-draft")
    windowed = DraftConfig.from_target(llama.config, sliding_window=4, feature_layers=None).to_dict()
    JakiroDraft.from_target(llama, feature_layers=None).save_pretrained(tmp_path / "window-draft")
    JakiroDraft.from_target(llama).save_pretrained(tmp_path / "fused-draft")
    (tmp_path / "window-draft" / "config.json").write_text(json.dumps(windowed))
    capsys.readouterr()                               # the progress bars of save_pretrained
    # Gemma 3: its query_pre_attn_scalar scale (the tiny target's last layer is a global one).
    fails([tmp_path / "gemma-draft", tmp_path / "o", "--target", tmp_path / "gemma"], capsys,
          "cannot be expressed as EagleJakiroForCausalLM: an attention scale of 0.144")
    fails([tmp_path / "window-draft", tmp_path / "o", "--target", tmp_path / "llama"], capsys,
          "sliding-window attention (window 4) is not exported")
    fails([tmp_path / "gemma-draft", tmp_path / "o", "--target", tmp_path / "llama"], capsys,
          "the target is a 'llama' model, the draft was trained for 'gemma3_text'")
    fails(["jakiro", tmp_path / "o", "--target", tmp_path / "llama"], capsys, "the target does not match the draft")
    fails(["jakiro", tmp_path / "o", "--target", tmp_path / "nowhere"], capsys, "target")
    fails([tmp_path / "geglu-draft", tmp_path / "o", "--target", tmp_path / "geglu", "--arch", "vllm"], capsys,
          "GeGLU experts")
    fails([tmp_path / "fused-draft", tmp_path / "o", "--target", tmp_path / "llama"], capsys,
          "it fuses the target's layers [1] with the last (EAGLE-3 features")


# ------------------------------------------------------------------ against the installed vLLM
def test_vllm_loads_the_exports(tmp_path):
    """vLLM's own model loader builds both draft classes from the exports of the shipped drafts
    and finds every tensor where it expects it (vLLM's qkv/gate_up stacking included)."""
    pytest.importorskip("vllm", reason="vLLM is not installed here (scripts/check_vllm.sh runs this in its venv)")
    import os

    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.utils.torch_utils import set_default_torch_dtype

    import jakiro.vllm_plugin
    jakiro.vllm_plugin.register()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cases = [("eagle2", ["--arch", "vllm", "--drop-fc-bias"], "EagleLlamaForCausalLM"),
             ("jakiro", [], "EagleJakiroForCausalLM"), ("eagle2", [], "EagleJakiroForCausalLM")]
    for i, (kind, options, architecture) in enumerate(cases):
        out = tmp_path / f"{kind}-{i}"
        assert run_export(kind, out, *options) == 0
        exported = load_file(str(out / "model.safetensors"))
        engine = EngineArgs(model=str(resolve_target()), dtype="float32", enforce_eager=True, max_model_len=256,
                            speculative_config={"method": "eagle", "model": str(out), "num_speculative_tokens": 2})
        vllm_config = engine.create_engine_config()
        draft_config = vllm_config.speculative_config.draft_model_config
        assert draft_config.architectures == [architecture]
        with set_current_vllm_config(vllm_config):
            if i == 0:    # one process, one rank: what vLLM's worker sets up before it loads a model
                init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                             distributed_init_method=f"file://{tmp_path / 'dist'}")
                initialize_model_parallel(1, 1)
            # The loader's two steps without the CPU's weight repacking after them (which empties
            # the fused projections' parameters): build the class, then its load_weights on the files.
            loader = get_model_loader(vllm_config.load_config)
            with set_default_torch_dtype(draft_config.dtype), torch.device("cpu"):
                model = loader.create_model(vllm_config=vllm_config, model_config=draft_config)
            loader.load_weights(model, draft_config)
        assert type(model).__name__ == architecture
        # No embedding or head of its own: the proposer will share the target's.
        assert not getattr(model, "has_own_embed_tokens", False) and not getattr(model, "has_own_lm_head", False)
        params = dict(model.named_parameters())
        qkv = torch.cat([exported[f"layers.0.self_attn.{n}_proj.weight"] for n in "qkv"]).float()
        assert torch.equal(params["model.layers.0.self_attn.qkv_proj.weight"], qkv)
        assert torch.equal(params["model.fc.weight"], exported["fc.weight"].float())
        if architecture == "EagleLlamaForCausalLM":
            gate_up = torch.cat([exported["layers.0.mlp.gate_proj.weight"], exported["layers.0.mlp.up_proj.weight"]])
            assert torch.equal(params["model.layers.0.mlp.gate_up_proj.weight"], gate_up.float())
            assert isinstance(model.model.layers[0].input_layernorm, torch.nn.Identity)
        else:
            assert torch.equal(params["model.fc.bias"], exported["fc.bias"].float())
            assert torch.equal(params["model.layers.0.mlp.w_down"], exported["layers.0.mlp.w_down"].float())
        # The target's RoPE: the cos/sin vLLM's draft rotates by are the target's own.
        rotary = model.model.layers[0].self_attn.rotary_emb
        theta = json.loads((resolve_target() / "config.json").read_text())["rope_parameters"]["rope_theta"]
        inv_freq = 1.0 / theta ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
        cos = (torch.arange(5, dtype=torch.float64)[:, None] * inv_freq).cos()
        torch.testing.assert_close(rotary.cos_sin_cache[:5, :32].double(), cos, rtol=1e-5, atol=1e-5)
    assert jakiro.__file__     # the installed jakiro (not the checkout's) ran the plugin
