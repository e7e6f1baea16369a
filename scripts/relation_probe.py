"""Can a fresh fusion learn spatial relations from given image and text tokens? (issue 6)

A 2-layer cross-attention fusion and an ITM head, alone, learn to tell a two-object training
caption from its positions-swapped false caption (`vlp-synthetic`'s training negatives). The
inputs are frozen, so each side can be swapped for an ideal one:

    python scripts/relation_probe.py --image objects --text random           # ideal both: learns
    python scripts/relation_probe.py --image objects --text tower CKPT       # the recipe's text
    python scripts/relation_probe.py --image tower --text random CKPT        # the recipe's patches
    python scripts/relation_probe.py --image pixels --coords --text random   # ViLT-style patches

Image tokens: `objects`, one per object (colour and shape one-hot, x, y): what detector regions
with boxes give; `tower`, the checkpoint's own fusion input (or `--stage N`, a ResNet stage);
`pixels`, 8×8-pixel patches. `--coords` appends each patch's (x, y). Text tokens: `random`,
a fixed random vector per word and per position; `tower`, the checkpoint's text tower.
Prints the validation accuracy (images of dataset seed 1) every 200 steps; chance is 50%.
"""
import argparse

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2

from vlp.checkpoint import load_model
from vlp.data import synthetic
from vlp.models.fusion import CrossAttentionFusion
from vlp.models.heads import ITMHead
from vlp.models.tokens import image_tokens

WIDTH, PATCH = 128, 8


def drawn_objects(seed: int, index: int) -> list[dict]:
    """The objects of a training image with their coordinates, which its metadata leaves out:
    `synthetic.render_sample`'s first random draws, repeated."""
    rng = np.random.default_rng([seed, synthetic.SPLITS["train"], index])
    count = 1 + int(rng.random() < 0.5)
    return synthetic._sample_objects(rng, rng.choice(synthetic._TRAIN_IDS, size=count, replace=False))


def position_swap_pairs(seed: int, count: int) -> list[tuple]:
    """(image, objects, caption, false caption) of the two-object images among the first `count`
    of a training split whose caption names where things are (they have a positions-swapped one)."""
    pairs = []
    for index in range(count):
        image, caption, meta = synthetic.render_sample(seed, "train", index)
        if len(meta.get("negatives") or []) == 2:  # colours swapped, positions swapped
            pairs.append((image, drawn_objects(seed, index), caption, meta["negatives"][1]))
    return pairs


def object_tokens(objects: list[dict]) -> torch.Tensor:
    """(2, 15): per object, colour and shape one-hot, x and y in [-2, 2], and a 1."""
    tokens = torch.zeros(2, len(synthetic.COLOURS) + len(synthetic.SHAPES) + 3)
    for row, obj in zip(tokens, objects):
        row[list(synthetic.COLOURS).index(obj["colour"])] = 1
        row[len(synthetic.COLOURS) + synthetic.SHAPES.index(obj["shape"])] = 1
        row[-3:] = torch.tensor([obj["x"] * 4 - 2, obj["y"] * 4 - 2, 1.0])
    return tokens


def with_coords(tokens: torch.Tensor) -> torch.Tensor:
    """Appends the (x, y) in [-2, 2] of each token of a square grid (B, N, W) -> (B, N, W + 2)."""
    side = round(tokens.shape[1] ** 0.5)
    centres = (torch.arange(side) + 0.5) / side * 4 - 2
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    return torch.cat([tokens, torch.stack([x, y], -1).reshape(1, -1, 2).expand(len(tokens), -1, -1)], dim=-1)


@torch.no_grad()
def encode(pairs: list[tuple], args, model) -> tuple:
    """Image tokens (B, N, W) and (tokens, padding, cls index) of the true and false captions."""
    if args.image == "objects":
        images = torch.stack([object_tokens(objects) for _, objects, _, _ in pairs])
    else:
        pixels = torch.stack([args.transform(image) for image, *_ in pairs])
        if args.image == "pixels":
            grid = pixels.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # (B, 3, H/P, W/P, P, P)
            images = grid.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        elif args.stage is None:
            images = torch.cat([image_tokens(model.image_tower, chunk)[1] for chunk in pixels.split(256)])
        else:
            images = model.image_tower.forward_intermediates(pixels, indices=[args.stage], intermediates_only=True)[
                "image_intermediates"][0].flatten(2).transpose(1, 2)
        if args.coords:
            images = with_coords(images)
    return images, *(text([pair[k] for pair in pairs], args, model) for k in (2, 3))


def text(captions: list[str], args, model) -> tuple:
    """(tokens (B, L, W), padding (B, L), cls index (B,)) of captions: the tower's, or random vectors."""
    if args.text == "tower":
        return model.encode_text_tokens(model.tokenizer(captions))
    ids = args.tokenizer(captions)
    return args.words[ids] + args.positions[:ids.shape[1]], ids == 0, ids.argmax(dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="a fusion checkpoint (for --image tower, --text tower)")
    parser.add_argument("--image", choices=("objects", "tower", "pixels"), default="objects")
    parser.add_argument("--stage", type=int, help="with --image tower: a ResNet stage's feature map instead")
    parser.add_argument("--coords", action="store_true", help="append each patch token's (x, y)")
    parser.add_argument("--text", choices=("random", "tower"), default="random")
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    needs_model = args.image == "tower" or args.text == "tower"
    if needs_model and not args.checkpoint:
        parser.error("--image tower and --text tower need a checkpoint")
    torch.manual_seed(0)
    model = load_model(args.checkpoint).eval() if needs_model else None
    args.transform = image_transform_v2(PreprocessCfg(**model.preprocess) if model else PreprocessCfg(size=64), False)
    args.tokenizer = model.tokenizer if model else open_clip.get_tokenizer("ViT-B-32")
    draws = torch.Generator().manual_seed(1)  # the random text's fixed vectors, per word and per position
    args.words, args.positions = torch.randn(49409, WIDTH, generator=draws), torch.randn(77, WIDTH, generator=draws)
    train, val = encode(position_swap_pairs(0, 9000), args, model), encode(position_swap_pairs(1, 1500), args, model)
    fusion = CrossAttentionFusion(train[0].shape[2], train[1][0].shape[2], train[0].shape[1], width=WIDTH, heads=4,
                                  layers=2)
    head = ITMHead(WIDTH)
    optimizer = torch.optim.AdamW([*fusion.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.0)

    def margins(data, rows):
        """ITM match-minus-no-match logits of the true and of the false captions of `rows`."""
        images, *captions = data
        logits = [head(fusion(images[rows], *(x[rows] for x in caption)).cls) for caption in captions]
        return [pair[:, 1] - pair[:, 0] for pair in logits]

    print(f"{len(train[0])} training pairs, {len(val[0])} validation pairs; image tokens {tuple(train[0].shape[1:])}")
    for step in range(args.steps + 1):
        true, false = margins(train, torch.randint(len(train[0]), (64,)))
        loss = F.softplus(-true).mean() + F.softplus(false).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 200 == 0:
            with torch.no_grad():
                true, false = margins(val, torch.arange(len(val[0])))
            print(f"step {step:5d}  loss {loss.item():.3f}  validation accuracy {(true > false).float().mean():.1%}",
                  flush=True)


if __name__ == "__main__":
    main()
