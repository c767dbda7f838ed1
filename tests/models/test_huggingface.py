"""Hugging Face models built from small configs (nothing downloaded): an encoder (BERT), a decoder
(GPT-2, whose attention and MLP are HF ``Conv1D``), a vision transformer (ViT), a conv net
(ConvNeXt), an audio model (Wav2Vec2) and a state-space model (Mamba). No ``layout=`` anywhere:
each capture equals an independent hook reduced on the axes the architecture has, each ablation
curve equals hand-applied masks, and a 2-epoch fit with the three monitors logs every key."""

import pytest
import torch
from torch import nn

import netprobe
from netprobe.metrics import ablation_curve

T = pytest.importorskip("transformers")

N, SEQ, CLASSES = 12, 9, 3


class Logits(nn.Module):
    """A Hugging Face model as ``x -> class scores`` (a head on the mean hidden state when it has none)."""

    def __init__(self, hf, hidden=None):
        super().__init__()
        self.hf = hf
        self.head = nn.Linear(hidden, CLASSES) if hidden else None

    def forward(self, x):
        out = self.hf(x)
        return self.head(out.last_hidden_state.mean(1)) if self.head is not None else out.logits


def _bert():
    cfg = T.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                       max_position_embeddings=32, num_labels=CLASSES, hidden_act="relu")
    return Logits(T.BertForSequenceClassification(cfg))


def _gpt2():
    cfg = T.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32, num_labels=CLASSES, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, activation_function="relu")
    return Logits(T.GPT2ForSequenceClassification(cfg))


def _vit():
    cfg = T.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=24, num_labels=CLASSES, hidden_act="relu")
    return Logits(T.ViTForImageClassification(cfg))


def _convnext():
    cfg = T.ConvNextConfig(num_channels=1, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=CLASSES, image_size=8,
                           hidden_act="relu")
    return Logits(T.ConvNextForImageClassification(cfg))


def _wav2vec2():
    cfg = T.Wav2Vec2Config(vocab_size=10, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                           conv_dim=(8, 8), conv_stride=(4, 4), conv_kernel=(8, 4), num_feat_extract_layers=2,
                           num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, num_labels=CLASSES,
                           do_stable_layer_norm=True, feat_extract_norm="layer", feat_extract_activation="relu",
                           hidden_act="relu")
    return Logits(T.Wav2Vec2ForSequenceClassification(cfg))


def _mamba():
    cfg = T.MambaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, state_size=4, expand=2, conv_kernel=2,
                        hidden_act="relu")
    return Logits(T.MambaModel(cfg), hidden=16)


def _ids(g):
    return torch.randint(3, 40, (N, SEQ), generator=g)


def _images(g):
    return torch.randn(N, 1, 8, 8, generator=g)


# Per model: how to build it and its inputs; `layers`: {layer: the axes an independent hook's output
# is averaged over for one row per input} (the architecture's own layout, written here by hand);
# `glob`: a pattern for two layers and their axes; `act`: the layer ablated (a ReLU unless `relu`
# is False, then also the layer of the selectivity monitor) and its units axis.
CASES = {
    "bert": dict(build=_bert, inputs=_ids,
                 layers={"hf.bert.encoder.layer.0.output": (1,), "hf.bert.encoder.layer.1.intermediate": (1,)},
                 glob=("hf.bert.encoder.layer.*.output", (1,)),
                 act=("hf.bert.encoder.layer.0.intermediate.intermediate_act_fn", 2)),
    "gpt2": dict(build=_gpt2, inputs=_ids,  # c_fc is HF's Conv1D
                 layers={"hf.transformer.h.0.mlp.c_fc": (1,), "hf.transformer.h.1.attn.c_attn": (1,)},
                 glob=("hf.transformer.h.*.mlp", (1,)), act=("hf.transformer.h.0.mlp.act", 2)),
    "vit": dict(build=_vit, inputs=_images,
                layers={"hf.vit.layers.0.mlp.fc1": (1,), "hf.vit.layers.1": (1,)},
                glob=("hf.vit.layers.*.mlp", (1,)), act=("hf.vit.layers.0.mlp.activation_fn", 2)),
    "convnext": dict(build=_convnext, inputs=_images,
                     layers={"hf.convnext.encoder.stages.0.layers.0.pwconv1": (1, 2),  # inside the block: NHWC
                             "hf.convnext.encoder.stages.1.layers.0": (2, 3)},  # the block's output: NCHW
                     glob=("hf.convnext.encoder.stages.*.layers.0", (2, 3)),
                     act=("hf.convnext.encoder.stages.0.layers.0.act", 3)),
    "wav2vec2": dict(build=_wav2vec2, inputs=lambda g: torch.randn(N, 200, generator=g),
                     layers={"hf.wav2vec2.feature_extractor.conv_layers.0": (2,),  # (N, C, L) after its transposed LayerNorm
                             "hf.wav2vec2.encoder.layers.1.feed_forward": (1,)},
                     glob=("hf.wav2vec2.encoder.layers.*.feed_forward", (1,)),
                     act=("hf.wav2vec2.feature_extractor.conv_layers.1.activation", 1)),
    "mamba": dict(build=_mamba, inputs=_ids,
                  layers={"hf.layers.0.mixer.in_proj": (1,), "hf.layers.1.mixer": (1,)},
                  glob=("hf.layers.*.mixer", (1,)), act=("hf.layers.0.mixer.in_proj", 2), relu=False),  # (its ReLU is fused)
}


def _model(name, seed=0):
    torch.manual_seed(seed)
    return CASES[name]["build"]().eval()


def _data(name, seed=1):
    g = torch.Generator().manual_seed(seed)
    return CASES[name]["inputs"](g), torch.randint(0, CLASSES, (N,), generator=g)


def _hooked(model, names, x):
    """Independent reference: the raw output of each named module from plain forward hooks."""
    mods = dict(model.named_modules())
    seen, hs = {}, []
    for n in names:
        hs.append(mods[n].register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, (o[0] if isinstance(o, tuple) else o).detach())))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hs:
            h.remove()
    return seen


@pytest.mark.parametrize("name", list(CASES))
def test_captures_by_name_and_glob_equal_an_independent_hook(name):
    model = _model(name)
    x, _ = _data(name)
    layers, (glob, glob_axes) = CASES[name]["layers"], CASES[name]["glob"]
    with netprobe.probe(model, list(layers)) as p, torch.no_grad():
        model(x)
    raw = _hooked(model, list(layers), x)
    for layer, axes in layers.items():
        torch.testing.assert_close(p[layer], raw[layer].mean(axes).float(), msg=layer)
    with netprobe.probe(model, [glob]) as pg, torch.no_grad():
        model(x)
    assert len(pg.layers) == 2, pg.layers
    raw = _hooked(model, pg.layers, x)
    for layer in pg.layers:
        torch.testing.assert_close(pg[layer], raw[layer].mean(glob_axes).float(), msg=layer)


@pytest.mark.parametrize("name", list(CASES))
def test_ablation_curve_equals_hand_applied_masks(name):
    model = _model(name)
    x, y = _data(name)
    layer, unit_axis = CASES[name]["act"]
    mod = dict(model.named_modules())[layer]
    width = _hooked(model, [layer], x)[layer].shape[unit_axis]
    order = torch.randperm(width, generator=torch.Generator().manual_seed(2))
    fractions = [0.0, 0.5, 1.0]
    r = ablation_curve(model, layer, (x, y), fractions=fractions, order=order)
    for j, f in enumerate(fractions):
        k = round(f * width)

        def mask(m, a, out, k=k):
            out = out.clone()
            idx = [slice(None)] * out.ndim
            idx[unit_axis] = order[:k]
            out[tuple(idx)] = 0.0
            return out

        h = mod.register_forward_hook(mask)
        try:
            with torch.no_grad():
                logits = model(x)
        finally:
            h.remove()
        assert float(r.accuracy[j]) == pytest.approx(float((logits.argmax(1) == y).double().mean())), (name, f)


@pytest.mark.parametrize("name", list(CASES))
def test_two_epoch_fit_with_three_monitors_logs_every_key(name):
    pl = pytest.importorskip("pytorch_lightning")
    from zoo_models import lit_class

    from netprobe.lightning import ConvergenceMonitor, RelianceMonitor, SelectivityMonitor

    model = _model(name)
    x, y = _data(name)
    act = "net." + CASES[name]["act"][0]
    mons = [RelianceMonitor([act], num_samples=N, repeats=1),
            ConvergenceMonitor(["net." + n for n in CASES[name]["layers"]], num_samples=N, methods=("cka",))]  # PWCCA needs n >= 32
    if CASES[name].get("relu", True):  # selectivity is defined for non-negative activations
        mons.append(SelectivityMonitor([act], num_samples=N))
    tr = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, max_epochs=2, callbacks=mons)
    tr.fit(lit_class(pl)(model), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6))
    expected = [k for mon in mons for k in mon.logged_keys(tr.lightning_module)
                if not k.startswith(("netprobe/time/", "netprobe/layer_index/", "netprobe/layer_units/", "netprobe/layer_type/"))]
    missing = [k for k in expected if k not in tr.callback_metrics]
    assert not missing, missing


def test_a_key_value_cache_passed_to_the_model_is_left_as_the_users_calls_leave_it():
    """GPT-2 called with a ``DynamicCache`` under a probe: the observed passes run on copies of the
    cache, so the next step's logits (which read it) equal an unprobed run's."""
    cfg = T.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32, activation_function="relu",
                       bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    lm = T.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 40, (3, 5))

    def two_steps(probed):
        cache = T.DynamicCache()
        with torch.no_grad():
            if probed:
                with netprobe.probe(lm, ["transformer.h.0.mlp"], capacity=64) as p:
                    first = lm(ids, past_key_values=cache, use_cache=True)
                assert p["transformer.h.0.mlp"].shape == (3, 16)
            else:
                first = lm(ids, past_key_values=cache, use_cache=True)
            second = lm(ids[:, :1], past_key_values=first.past_key_values, use_cache=True)
        return first.logits, second.logits

    for plain, probed in zip(two_steps(False), two_steps(True)):
        torch.testing.assert_close(probed, plain, rtol=0, atol=0)
