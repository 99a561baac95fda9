"""Hugging Face causal LMs as smskd models: logits, taps, checkpoints, builders."""

from __future__ import annotations

import copy
import socket
import subprocess
import sys

import pytest
import torch

from smskd.errors import UserError
from smskd.models import causal_lm
from smskd.models.registry import (
    MODELS,
    build_model,
    check_model_name,
    listed_parameter_count,
)
from smskd.models.taps import FeatureTaps

transformers = pytest.importorskip("transformers")

VOCAB, BATCH, LENGTH = 20, 2, 8
# name → (zoo model, kwargs): tiny widths; "llama-gqa" has 4 query heads on 2 kv heads.
ARCHS = {
    "gpt2": ("gpt2", {"n_embd": 16, "n_head": 2, "n_positions": 16}),
    "llama": ("llama", {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}),
    "llama-gqa": (
        "llama",
        {
            "hidden_size": 16,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 32,
        },
    ),
}


def build(arch: str) -> causal_lm.CausalLM:
    torch.manual_seed(0)
    name, kwargs = ARCHS[arch]
    model = build_model(name, VOCAB, 1, kwargs)
    assert isinstance(model, causal_lm.CausalLM)
    return model


def token_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))


def decoder_parts(model: causal_lm.CausalLM):
    """(decoder layers, attention module of a layer, its output projection, final norm)."""
    if model.lm.config.model_type == "gpt2":
        body = model.lm.transformer
        return body.h, lambda layer: layer.attn, lambda attn: attn.c_proj, body.ln_f
    body = model.lm.model
    return body.layers, lambda layer: layer.self_attn, lambda attn: attn.o_proj, body.norm


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_and_taps_match_transformers_outputs(arch: str) -> None:
    model = build(arch).eval()
    config = model.lm.config
    layers, attention_of, out_proj_of, final_norm = decoder_parts(model)
    count, heads = config.num_hidden_layers, config.num_attention_heads
    head_dim = config.hidden_size // heads
    layout = model.tap_layout
    assert layout.features == tuple(f"hidden.{i}" for i in range(count))
    assert layout.attention == tuple(f"attention.{i}" for i in range(count))
    assert layout.values == tuple(f"values.{i}" for i in range(count))
    assert layout.embedding == "lm.lm_head:input"
    assert layout.role("last_attention") == f"attention.{count - 1}"
    assert layout.role("last_values") == f"values.{count - 1}"
    modules = [
        f"lm.{name}" for name, m in model.lm.named_modules() if m in set(map(attention_of, layers))
    ]
    ids = token_ids()
    taps = [*layout.features, *layout.attention, *layout.values, layout.embedding, *modules]
    with torch.no_grad(), FeatureTaps(model, taps) as tapped:
        logits = model(ids)
        got = dict(tapped.features)
        # Without a KV cache, as CausalLM calls it: with one, some CPUs (an AMD EPYC here)
        # take another kernel and the logits differ in the last bit.
        reference = model.lm(
            ids, use_cache=False, output_hidden_states=True, output_attentions=True
        )
    assert isinstance(logits, torch.Tensor) and logits.shape == (BATCH, LENGTH, VOCAB)
    assert torch.equal(logits, reference.logits)
    # transformers: hidden_states = (embeddings, layer 0, ..., final_norm(last layer)).
    assert len(reference.hidden_states) == count + 1
    for i in range(count - 1):
        assert torch.equal(got[f"hidden.{i}"], reference.hidden_states[i + 1])
    last = got[f"hidden.{count - 1}"]
    assert last.shape == (BATCH, LENGTH, config.hidden_size)
    with torch.no_grad():
        assert torch.equal(final_norm(last), reference.hidden_states[-1])
    assert torch.equal(got[layout.embedding], reference.hidden_states[-1])
    causal = torch.ones(LENGTH, LENGTH, dtype=torch.bool).triu(1)
    for i in range(count):
        attention, values = got[f"attention.{i}"], got[f"values.{i}"]
        assert attention.shape == (BATCH, heads, LENGTH, LENGTH)
        assert torch.equal(attention, reference.attentions[i])
        torch.testing.assert_close(attention.sum(-1), torch.ones(BATCH, heads, LENGTH))
        assert torch.all(attention[..., causal] == 0)
        assert values.shape == (BATCH, heads, LENGTH, head_dim)
        # The values are what each query head mixes: re-doing the attention's
        # output from the two taps gives the attention module's output.
        mixed = (attention @ values).transpose(1, 2).reshape(BATCH, LENGTH, -1)
        attention_module = attention_of(layers[i])
        with torch.no_grad():
            redone = out_proj_of(attention_module)(mixed)
        torch.testing.assert_close(redone, got[modules[i]][0])


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa"])
def test_train_mode_gradients_flow_and_attention_is_captured(arch: str) -> None:
    model = build(arch)
    layout = model.tap_layout
    ids = token_ids()
    with FeatureTaps(model.eval(), layout.attention) as tapped:
        with torch.no_grad():
            model(ids)
        eval_attention = dict(tapped.features)
    with FeatureTaps(model.train(), [*layout.attention, *layout.values]) as tapped:
        logits = model(ids)
        attention = tapped.features[layout.attention[-1]]
        assert attention.requires_grad
        # No dropout by default: training-mode probabilities are the eval ones.
        for tap, probabilities in eval_attention.items():
            assert torch.equal(tapped.features[tap], probabilities)
        loss = logits.logsumexp(-1).mean() + attention.square().mean()
        loss = loss + tapped.features[layout.values[0]].square().mean()
        loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa"])
def test_save_pretrained_loads_in_transformers_with_the_same_logits(arch: str, tmp_path) -> None:
    model = build(arch).eval()
    ids = token_ids()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    auto = transformers.AutoModelForCausalLM
    eager = auto.from_pretrained(tmp_path, attn_implementation="eager").eval()
    default = auto.from_pretrained(tmp_path).eval()  # SDPA: same maths, another kernel
    with torch.no_grad():
        expected = model(ids)  # untapped: SDPA, as transformers' default
        assert model.lm.config._attn_implementation == "sdpa"
        # use_cache=False as CausalLM calls them (test_logits_and_taps_match_...).
        assert torch.equal(default(ids, use_cache=False).logits, expected)
        torch.testing.assert_close(eager(ids, use_cache=False).logits, expected)
        with FeatureTaps(model, model.tap_layout.attention):
            assert torch.equal(model(ids), eager(ids, use_cache=False).logits)  # tapped: eager
    # hf-pretrained builds the same model from the directory.
    loaded = build_model("hf-pretrained", VOCAB, 1, {"path": str(tmp_path)})
    assert isinstance(loaded, causal_lm.CausalLM)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids), expected)
    with FeatureTaps(loaded, loaded.tap_layout.attention) as tapped:
        loaded(ids)
        assert loaded.lm.config._attn_implementation == "eager"
        assert set(tapped.features) == set(loaded.tap_layout.attention)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_state_dict_is_the_wrapped_models_and_round_trips(arch: str) -> None:
    model = build(arch).eval()
    state = model.state_dict()
    assert state and all(key.startswith("lm.") for key in state)
    assert {key.removeprefix("lm.") for key in state} == set(model.lm.state_dict())
    torch.manual_seed(123)
    other = build_model(*ARCHS[arch][:1], VOCAB, 1, ARCHS[arch][1]).eval()
    ids = token_ids()
    with torch.no_grad():
        assert not torch.equal(other(ids), model(ids))
        other.load_state_dict(state)  # strict
        assert torch.equal(other(ids), model(ids))
    if arch == "gpt2":  # tied: the LM head is the token embedding
        assert other.lm.lm_head.weight is other.lm.transformer.wte.weight


def test_deepcopy_feeds_its_own_taps() -> None:
    model = build("gpt2").eval()
    twin = copy.deepcopy(model)
    ids = token_ids()
    taps = ["hidden.0", "values.0"]
    with FeatureTaps(model, taps) as original, FeatureTaps(twin, taps) as copied, torch.no_grad():
        twin(ids)
        assert set(copied.features) == set(taps)
        assert not original.features


def test_context_length() -> None:
    model = build("gpt2")
    assert model.max_positions == 16
    with pytest.raises(UserError, match=r"17 tokens exceed the model's context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    assert build("llama").max_positions == 256  # the builder's default


def test_hf_pretrained_refuses_what_is_not_a_local_model(tmp_path) -> None:
    with pytest.raises(UserError) as caught:
        build_model("hf-pretrained", VOCAB, 1, {"path": "gpt2"})
    message = str(caught.value)
    assert "\n" not in message
    assert (
        "hf-pretrained path 'gpt2' is not a local directory; this machine loads models only "
        "from disk: save one with save_pretrained and give its directory"
    ) in message
    with pytest.raises(UserError, match=r"needs kwargs \{path: DIR\}"):
        build_model("hf-pretrained", VOCAB, 1, {})
    with pytest.raises(UserError, match=r"holds no readable model config"):
        build_model("hf-pretrained", VOCAB, 1, {"path": str(tmp_path)})
    build("gpt2").save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError, match=r"vocabulary of 20 tokens but the data has 30") as caught:
        build_model("hf-pretrained", 30, 1, {"path": str(tmp_path / "gpt2")})
    assert "\n" not in str(caught.value)
    transformers.OPTForCausalLM(
        transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=8,
            num_hidden_layers=1,
            ffn_dim=16,
            num_attention_heads=2,
            word_embed_proj_dim=8,
        )
    ).save_pretrained(tmp_path / "opt")
    with pytest.raises(UserError, match=r"holds a 'opt' model; supported model types: 'gpt2'"):
        build_model("hf-pretrained", VOCAB, 1, {"path": str(tmp_path / "opt")})


def test_hf_pretrained_refuses_a_checkpoint_with_missing_weights(tmp_path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    build("llama").save_pretrained(tmp_path)
    weights = safetensors.load_file(tmp_path / "model.safetensors")
    del weights["model.layers.0.mlp.up_proj.weight"]
    safetensors.save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"lacks 1 weight\(s\).*up_proj.*they would be random"):
        build_model("hf-pretrained", VOCAB, 1, {"path": str(tmp_path)})


def test_hf_pretrained_never_touches_the_network(tmp_path, monkeypatch) -> None:
    build("llama").save_pretrained(tmp_path)

    def refuse(*_args, **_kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    model = build_model("hf-pretrained", VOCAB, 1, {"path": str(tmp_path)})
    assert isinstance(model, causal_lm.CausalLM)


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("gpt2", {"n_layers": 3}, r"unknown GPT2Config key\(s\) 'n_layers'; valid: .*'n_layer'"),
        ("gpt2", {"hidden_size": 32}, r"unknown GPT2Config key\(s\) 'hidden_size'.*'n_embd'"),
        ("gpt2", {"vocab_size": 50}, r"unknown GPT2Config key\(s\) 'vocab_size'"),
        ("llama", {"num_layers": 3}, r"'num_layers'; valid: .*'num_hidden_layers'"),
        ("llama", {"num_attention_heads": 3}, r"not a multiple of the number of attention heads"),
        ("gpt2", {"attn_implementation": "sdpa"}, r"unknown GPT2Config key\(s\)"),
    ],
)
def test_bad_config_is_a_one_line_user_error(name: str, kwargs: dict, expected: str) -> None:
    with pytest.raises(UserError, match=expected) as caught:
        build_model(name, VOCAB, 1, kwargs)
    assert "\n" not in str(caught.value)


def test_builder_defaults_and_given_dropout() -> None:
    gpt2 = build_model("gpt2", VOCAB, 3).lm.config
    assert (gpt2.n_layer, gpt2.n_embd, gpt2.n_head, gpt2.n_positions) == (2, 64, 2, 256)
    assert (gpt2.resid_pdrop, gpt2.embd_pdrop, gpt2.attn_pdrop) == (0.0, 0.0, 0.0)
    assert gpt2.vocab_size == VOCAB and gpt2.eos_token_id is None
    assert build_model("gpt2", VOCAB, 3, {"attn_pdrop": 0.2}).lm.config.attn_pdrop == 0.2
    llama = build_model("llama", VOCAB, 3).lm.config
    assert (llama.num_hidden_layers, llama.hidden_size, llama.num_attention_heads) == (2, 64, 2)
    assert (llama.num_key_value_heads, llama.intermediate_size) == (2, 256)
    assert llama.attention_dropout == 0.0
    assert causal_lm.llama_intermediate_size(4096) == 11008  # LLaMA-7B
    assert "small defaults" in MODELS["gpt2"].description
    assert "small defaults" in MODELS["llama"].description


def test_unsupported_wrapped_model_is_refused() -> None:
    opt = transformers.OPTForCausalLM(
        transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=8,
            num_hidden_layers=1,
            ffn_dim=16,
            num_attention_heads=2,
            word_embed_proj_dim=8,
        )
    )
    with pytest.raises(ValueError, match=r"no smskd taps for model_type 'opt'; supported"):
        causal_lm.CausalLM(opt)


def test_missing_transformers_is_a_one_line_user_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    hint = r"model 'gpt2' needs transformers: pip install 'smskd\[lm\]'"
    with pytest.raises(ValueError, match=hint):
        check_model_name("gpt2")  # at config load, before any training
    with pytest.raises(UserError, match=hint):
        build_model("gpt2", VOCAB, 1)
    with pytest.raises(UserError, match=hint):
        causal_lm.build_gpt2(VOCAB)
    with pytest.raises(UserError, match=r"model 'llama' needs transformers"):
        causal_lm.build_llama(VOCAB)
    assert listed_parameter_count("gpt2", VOCAB, 1) is None  # `smskd models` still lists


def test_listing_counts_parameters_where_defaults_build() -> None:
    assert (
        listed_parameter_count("gpt2", VOCAB, 1) == causal_lm.build_gpt2(VOCAB).lm.num_parameters()
    )
    assert listed_parameter_count("hf-pretrained", VOCAB, 1) is None  # needs a path


@pytest.mark.slow
def test_importing_smskd_does_not_import_transformers() -> None:
    code = (
        "import sys, smskd; from smskd.models.registry import MODELS; "
        "assert 'gpt2' in MODELS and 'hf-pretrained' in MODELS; "
        "assert 'transformers' not in sys.modules, 'transformers was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
