"""The model directory as others read it: peft loads its LoRA adapter onto the whole backbone."""

import json
import warnings

import torch
from peft import PeftModel

from common.backbone import mean_pool
from common.files import ADAPTER_CONFIG
from common.weights import (
    load_model_dir,
    load_trainable_state,
    save_model_dir,
    trainable_state,
)
from tests.tiny import NUM_ITEMS, TOKENS, tiny_bert, tiny_setup


def test_peft_loads_the_saved_adapter_and_reproduces_the_item_vectors(tmp_path):
    cfg, trained, _, bert = tiny_setup(1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every trainable tensor away from its init (lora_B starts at zero)
        for p in trained.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    layers = bert.config.num_hidden_layers
    path = save_model_dir(
        tmp_path / "model",
        state=trainable_state(trained),
        cfg=cfg,
        metadata={"backbone_layers": layers},
    )
    # The project's side: a fresh model from the directory, over the lower block's states.
    _, model, _, _ = tiny_setup(1)
    load_trainable_state(model, load_model_dir(path)[0])
    model.eval()
    tokens = torch.randint(1, 40, (NUM_ITEMS, TOKENS), generator=gen)
    mask = torch.ones(NUM_ITEMS, TOKENS, dtype=torch.bool)
    mask[::2, -2:] = False  # some items shorter than others
    ids = torch.arange(NUM_ITEMS)
    users = torch.randn(5, cfg.model_dim, generator=gen)
    with torch.no_grad():
        out = bert(input_ids=tokens, attention_mask=mask.long(), output_hidden_states=True)
        lower = out.hidden_states[layers - cfg.adapter_k]
        ours = model.items.head(model.items.encode(lower, mask), ids)
        # peft's side: the adapter directory onto the whole backbone, every layer run by peft
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(tiny_bert(0), str(path))
        top = peft_model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        theirs = model.items.head(mean_pool(top, mask), ids)
    assert not [w for w in caught if "adapter" in str(w.message).lower()]
    adapted = sorted(n for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
    assert [n.split("encoder.layer.")[1].split(".")[0] for n in adapted] == ["1", "1"]
    assert json.loads((path / ADAPTER_CONFIG).read_text())["layers_to_transform"] == [1]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(users @ theirs.T, users @ ours.T, atol=1e-5, rtol=0)
    assert torch.equal((users @ theirs.T).topk(10).indices, (users @ ours.T).topk(10).indices)
    # and the adapter is not a no-op: without it the vectors differ
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
    assert not torch.allclose(model.items.head(mean_pool(plain, mask), ids), ours, atol=1e-3)
