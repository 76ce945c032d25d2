"""Word-region grounding for training and attention supervision."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from captioner.data.datamodule import CaptionDataModule, CaptionDataset, collate_captions
from captioner.data.grounding import cell_shares
from captioner.data.shapes import COLOURS, SHAPES, SIZES, object_mask
from captioner.data.transforms import Preprocessing
from captioner.data.vocab import END_ID, PAD_ID
from captioner.metrics.attention_correctness import attention_correctness
from captioner.training.objectives import attention_supervision_loss
from tests.test_system import _batch, _system


@pytest.mark.parametrize(("grid", "size"), [(4, 32), (8, 64), (7, 50)])
def test_cell_shares_are_the_correctness_of_one_cell_maps(grid, size) -> None:
    """A map with all its mass on cell i scores cell_shares[i] on the evaluation metric."""
    rng = np.random.default_rng(grid)
    mask = rng.random((size, size)) < 0.2
    mask[size // 4: size // 2, size // 3: size // 2] = True
    shares = cell_shares(torch.from_numpy(mask), (grid, grid))  # (grid, grid)
    for i, j in [(0, 0), (grid // 2, grid // 3), (grid - 1, grid - 1), (1, grid - 2)]:
        one_cell = np.zeros((grid, grid))
        one_cell[i, j] = 1.0
        assert shares[i, j].item() == pytest.approx(attention_correctness(one_cell, mask), abs=1e-5)
    # batched masks give the same shares as one at a time
    stacked = torch.from_numpy(np.stack([mask, ~mask]))[None]  # (1, 2, H, W)
    both = cell_shares(stacked, (grid, grid))
    torch.testing.assert_close(both[0, 0], shares)
    torch.testing.assert_close(both[0, 1], 1 - shares, atol=1e-5, rtol=0)


def _datamodule(shapes_dir, max_caption_length: int = 20, **shapes) -> CaptionDataModule:
    return CaptionDataModule(dataset="shapes", shapes={"data_dir": str(shapes_dir), "image_size": 32, **shapes},
                             min_count=1, batch_size=8, num_workers=0, preprocessing=Preprocessing(32),
                             max_caption_length=max_caption_length)


def test_training_batches_name_the_object_of_every_word(shapes_dir) -> None:
    dm = _datamodule(shapes_dir, grounding=True)
    dm.prepare_data()
    batch = next(iter(dm.train_dataloader()))
    caps, objs, masks = batch["captions"], batch["token_objects"], batch["object_masks"]
    assert objs.shape == (caps.size(0), caps.size(1) - 1)  # one per target step
    assert masks.dtype == torch.bool and masks.shape[-2:] == (32, 32)
    records = dm.split_records("train")
    grounded_words = 0
    for row in range(caps.size(0)):
        rec = records[int(batch["indices"][row])]
        scene = rec.grounding["objects"]
        targets = caps[row, 1:]
        for t, (word_id, obj) in enumerate(zip(targets.tolist(), objs[row].tolist())):
            if word_id in (END_ID, PAD_ID):
                assert obj == -1, "<end> and padding name no object"
                continue
            word = dm.vocab.itos[word_id]
            if word in SIZES or word in COLOURS or word in SHAPES:
                assert obj >= 0, (t, word)
                grounded_words += 1
                assert word in (scene[obj]["size"], scene[obj]["colour"], scene[obj]["shape"])
                assert torch.equal(masks[row, obj], torch.from_numpy(object_mask(scene[obj], 32)))
            else:
                assert obj == -1, (t, word)
        # objects beyond the scene's own are empty padding
        assert not masks[row, len(scene):].any()
    assert grounded_words >= 3 * caps.size(0)
    # evaluation batches do not carry it
    assert "token_objects" not in next(iter(dm.val_dataloader()))


def test_relation_keywords_are_grounded_in_the_next_mention(shapes_dir) -> None:
    """ground_relations: "left"/"right"/"above"/"below" point at the object the relation is
    about, which is the mention that follows; everything else as without it."""
    dm = _datamodule(shapes_dir, grounding=True, ground_relations=True)
    dm.prepare_data()
    ds = dm.dataset_for("train")
    plain = _datamodule(shapes_dir, grounding=True)
    plain.prepare_data()
    plain_records = plain.dataset_for("train").records
    keywords = {"left", "right", "above", "below"}
    relations = 0
    for rec, ref in zip(ds.records, plain_records, strict=True):
        for tokens, objs, objs_plain in zip(rec.captions, rec.grounding["token_objects"],
                                            ref.grounding["token_objects"], strict=True):
            for pos, (word, obj, obj_plain) in enumerate(zip(tokens, objs, objs_plain, strict=True)):
                if word not in keywords:
                    assert obj == obj_plain
                    continue
                assert obj_plain == -1 and obj >= 0
                following = next(o for o in objs_plain[pos + 1:] if o >= 0)
                assert obj == following, (tokens, pos)
                relations += 1
    assert relations > 20
    with pytest.raises(ValueError, match="data.shapes.ground_relations needs data.shapes.grounding"):
        _datamodule(shapes_dir, ground_relations=True)


def test_grounding_survives_cut_captions(shapes_dir) -> None:
    dm = _datamodule(shapes_dir, grounding=True, max_caption_length=4)
    dm.prepare_data()
    ds = dm.dataset_for("train")
    item = ds[0]
    assert item["token_objects"].shape == (len(item["caption"]) - 1,)
    assert item["token_objects"][-1] == -1  # <end>
    batch = collate_captions([ds[i] for i in range(5)])
    assert batch["token_objects"].shape[1] == batch["captions"].shape[1] - 1


def test_grounding_errors_are_clear(shapes_dir, tmp_path) -> None:
    karpathy = CaptionDataModule(dataset="karpathy", karpathy={"split_file": str(shapes_dir / "dataset.json"),
                                                               "image_root": str(shapes_dir / "images")})
    assert not karpathy.grounding
    with pytest.raises(ValueError, match="data.dataset 'karpathy' has none: only the shapes source"):
        karpathy.dataset_for("train", grounding=True)
    plain = _datamodule(shapes_dir)
    with pytest.raises(ValueError, match="have none"):
        CaptionDataset(plain.split_records("train"), plain.vocab, None, grounding=True)
    # a grounding.json that disagrees with dataset.json names the image
    copy = tmp_path / "shapes"
    copy.mkdir()
    (copy / "dataset.json").write_text((shapes_dir / "dataset.json").read_text())
    g = json.loads((shapes_dir / "grounding.json").read_text())
    first = next(iter(g["images"]))
    g["images"][first]["captions"][0]["tokens"] = ["a", "tampered", "caption"]
    (copy / "grounding.json").write_text(json.dumps(g))
    with pytest.raises(ValueError, match=f"image {first} .* does not match dataset.json"):
        _datamodule(copy, grounding=True).dataset_for("train")
    # a relation the caption does not state, likewise
    g = json.loads((shapes_dir / "grounding.json").read_text())
    image, k = next((i, k) for i, e in g["images"].items() for k, c in enumerate(e["captions"]) if c["relations"])
    rel = g["images"][image]["captions"][k]["relations"][0]
    rel["relation"] = "below" if rel["relation"] != "below" else "above"
    (copy / "grounding.json").write_text(json.dumps(g))
    with pytest.raises(ValueError, match=f"image {image} .* caption {k} states"):
        _datamodule(copy, grounding=True, ground_relations=True).dataset_for("train")


def test_supervision_loss_is_minus_log_of_the_counted_mass() -> None:
    masks = torch.zeros(1, 2, 32, 32, dtype=torch.bool)
    masks[0, 0, 0:16, 0:16] = True  # the top-left quarter
    masks[0, 1, 16:, 16:] = True
    shares = cell_shares(masks, (4, 4)).flatten(2)  # (1, 2, 16)
    objs = torch.tensor([[-1, 0, 1, -1]])
    mask = torch.tensor([[True, True, True, False]])
    peaked = torch.zeros(1, 4, 16)
    peaked[0, :, 0] = 1.0  # cell (0, 0): inside object 0
    peaked[0, 2, :] = 0.0
    peaked[0, 2, 15] = 1.0  # cell (3, 3): inside object 1
    loss = attention_supervision_loss(peaked, objs, masks, mask)
    expected = -(torch.log(shares[0, 0, 0]) + torch.log(shares[0, 1, 15])) / 2
    torch.testing.assert_close(loss, expected)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)  # both cells lie wholly inside
    uniform = torch.full((1, 4, 16), 1 / 16)
    assert attention_supervision_loss(uniform, objs, masks, mask) > loss + 1.0
    # steps naming no object, and padded steps, do not count
    changed = peaked.clone()
    changed[0, 0] = changed[0, 3] = 1 / 16
    torch.testing.assert_close(attention_supervision_loss(changed, objs, masks, mask), loss)


def _grounded_batch() -> dict:
    batch = _batch()
    b, length = batch["captions"].shape
    objs = torch.full((b, length - 1), -1, dtype=torch.long)
    objs[:, 1:4] = 0
    objs[::2, 2] = 1
    masks = torch.zeros(b, 2, 32, 32, dtype=torch.bool)
    masks[:, 0, :12, :12] = True
    masks[:, 1, 20:, 8:30] = True
    return dict(batch, token_objects=objs, object_masks=masks)


@pytest.mark.parametrize(("attention", "settings"), [
    ("soft", {}), ("multihead", {}), ("hard", {"baseline": "expectation"}), ("hard", {}),
])
def test_supervision_adds_its_term_and_trains_the_attention(attention, settings) -> None:
    batch = _grounded_batch()
    losses = {}
    for weight in (0.0, 0.5):
        system = _system(attention, doubly_stochastic=0.0, attention_supervision=weight, **settings).train()
        torch.manual_seed(0)  # the same samples for hard attention
        losses[weight] = system.compute_loss(batch)
    sup = losses[0.5]["attention_supervision"]
    assert torch.isfinite(sup) and sup > 0
    torch.testing.assert_close(losses[0.5]["loss"], losses[0.0]["loss"] + 0.5 * sup)
    # the term reaches every parameter of the attention
    out = system.model(batch["images"], batch["captions"], batch["lengths"])
    attention_supervision_loss(out.alphas, batch["token_objects"], batch["object_masks"], out.mask).backward()
    grads = [p.grad for p in system.model.decoder.attention.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_supervision_lowers_its_loss_when_trained() -> None:
    system = _system("soft", doubly_stochastic=0.0, attention_supervision=1.0).train()
    batch = _grounded_batch()
    opt = torch.optim.Adam(system.parameters(), lr=3e-3)
    first = system.compute_loss(batch)["attention_supervision"].item()
    for _ in range(60):
        opt.zero_grad()
        system.compute_loss(batch)["loss"].backward()
        opt.step()
    assert system.compute_loss(batch)["attention_supervision"].item() < first / 3


def test_supervision_without_grounding_is_a_clear_error() -> None:
    system = _system("soft", attention_supervision=1.0).train()
    with pytest.raises(ValueError, match="data.shapes.grounding: true"):
        system.compute_loss(_batch())
    from captioner.system import LossConfig

    with pytest.raises(ValueError, match="attention_supervision"):
        LossConfig(attention_supervision=-1.0)
