"""Can a fresh fusion learn spatial relations from given image and text tokens? (issue 6)

A 2-layer cross-attention fusion and an ITM head, alone, learn to tell a two-object training
caption that says where things are from its false caption with the same coloured shapes elsewhere
(positions or objects swapped: `vlp-synthetic`'s training negatives). The
inputs are frozen, so each side can be swapped for an ideal one:

    python scripts/relation_probe.py --image objects --text random           # ideal both: learns
    python scripts/relation_probe.py --image objects --text tower CKPT       # the recipe's text
    python scripts/relation_probe.py --image tower --text random CKPT        # the recipe's patches
    python scripts/relation_probe.py --image pixels --coords --text random   # ViLT-style patches
    python scripts/relation_probe.py --image regions --text random CKPT      # regions with boxes
    python scripts/relation_probe.py --image regions --text words CKPT       # ... and own words

Image tokens: `objects`, one per object (colour and shape one-hot, x, y): what detector regions
with boxes give; `regions`, the checkpoint's ResNet stage `--stage` (default 2: 8×8) pooled over
each object's true box by `roi_align`, with the box (detector regions, learned features);
`tower`, the checkpoint's own fusion input (or `--stage N`, a ResNet stage); `pixels`, 8×8-pixel
patches. `--coords` appends each patch's (x, y). Text tokens: `random`,
a fixed random vector per word and per position; `words`, word and position embeddings of
the fusion's own, trained with it (VisualBERT and UNITER read word embeddings, not a text
tower's outputs); `tower`, the checkpoint's text tower.
Prints the validation accuracy (images of dataset seed 1) every 200 steps; chance is 50%.
"""
import argparse
import re

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from torchvision.ops import roi_align

from vlp.checkpoint import load_model
from vlp.data import synthetic
from vlp.data.synthetic_captions import SAYS_WHERE
from vlp.models.fusion import CrossAttentionFusion
from vlp.models.heads import ITMHead
from vlp.models.tokens import image_tokens

WIDTH, PATCH = 128, 8


def position_swap_pairs(seed: int, count: int) -> list[tuple]:
    """(image, objects, caption, false caption) of the two-object images among the first `count`
    of a training split whose caption names where things are, with the first of its false captions
    that puts the same coloured shapes elsewhere (positions or objects swapped, not colours);
    the objects as the sample's json lists them, with their boxes."""
    pairs = []
    for index in range(count):
        image, caption, meta = synthetic.render_sample(seed, "train", index)
        if len(meta["objects"]) != 2 or not SAYS_WHERE.search(caption):
            continue
        moved = [n for n in meta.get("negatives") or [] if coloured_shapes(n) == coloured_shapes(caption)]
        if moved:
            pairs.append((image, meta["objects"], caption, moved[0]))
    return pairs


def coloured_shapes(caption: str) -> set[str]:
    """The coloured shapes a caption names, e.g. {"red circle", "blue square"}."""
    return {name for name in synthetic.CLASSNAMES if re.search(rf"\b{name}\b", caption)}


def object_tokens(objects: list[dict]) -> torch.Tensor:
    """(2, 15): per object, colour and shape one-hot, its box centre's x and y in [-2, 2], and a 1."""
    tokens = torch.zeros(2, len(synthetic.COLOURS) + len(synthetic.SHAPES) + 3)
    for row, obj in zip(tokens, objects):
        row[list(synthetic.COLOURS).index(obj["colour"])] = 1
        row[len(synthetic.COLOURS) + synthetic.SHAPES.index(obj["shape"])] = 1
        x1, y1, x2, y2 = obj["box"]
        row[-3:] = torch.tensor([(x1 + x2) * 2 - 2, (y1 + y2) * 2 - 2, 1.0])
    return tokens


def boxes(objects: list[dict]) -> torch.Tensor:
    """(2, 4): each object's box (x1, y1, x2, y2) in fractions of the image side."""
    return torch.tensor([o["box"] for o in objects], dtype=torch.float32)


def region_tokens(feature_map: torch.Tensor, image_boxes: torch.Tensor) -> torch.Tensor:
    """(B, 2, C + 6): per object, the feature map (B, C, S, S) averaged over its box (`roi_align`,
    as detector-region systems pool their regions), and the box (x1, y1, x2, y2, width, height)
    scaled as `object_tokens` scales positions.

    The features are layer-normed to unit norm, a one-hot's: at the layer norm's own scale
    (norm √C) they drown the six box numbers in the fusion's input projection, and the
    relations are not learned (BENCHMARKS.md). UNITER and LXMERT layer-norm the projected
    features and the projected box separately, which balances them the same way.
    """
    count, side = image_boxes.shape[:2]
    rois = torch.cat([torch.arange(count).repeat_interleave(side)[:, None].float(), image_boxes.flatten(0, 1)], 1)
    pooled = roi_align(feature_map, rois, output_size=1, spatial_scale=feature_map.shape[-1], aligned=True).flatten(1)
    features = (F.layer_norm(pooled, pooled.shape[1:]) / pooled.shape[1] ** 0.5).view(count, side, -1)
    x1, y1, x2, y2 = image_boxes.unbind(-1)
    geometry = torch.stack([x1 * 4 - 2, y1 * 4 - 2, x2 * 4 - 2, y2 * 4 - 2, (x2 - x1) * 4, (y2 - y1) * 4], -1)
    return torch.cat([features, geometry], dim=-1)


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
        elif args.image == "tower" and args.stage is None:
            images = torch.cat([image_tokens(model.image_tower, chunk)[1] for chunk in pixels.split(256)])
        else:
            stage = 2 if args.stage is None else args.stage
            maps = torch.cat([model.image_tower.forward_intermediates(chunk, indices=[stage], intermediates_only=True)[
                "image_intermediates"][0] for chunk in pixels.split(256)])
            if args.image == "regions":
                images = region_tokens(maps, torch.stack([boxes(objects) for _, objects, _, _ in pairs]))
            else:
                images = maps.flatten(2).transpose(1, 2)
        if args.coords:
            images = with_coords(images)
    return images, *(text([pair[k] for pair in pairs], args, model) for k in (2, 3))


class OwnWords(nn.Module):
    """The fusion's own word and position embeddings, over the word ids that `ids` (B, L) use.

    Both start at unit scale. Which object a colour or shape word belongs to is in the word
    order, so the positions must be as strong as the words: under unit-scale words, 0.02-scale
    positions (BERT's) were not learned from; at 0.02 for both, AdamW's 1e-3 steps outran them.
    """

    def __init__(self, ids: torch.Tensor, width: int):
        super().__init__()
        used = ids.unique()
        self.register_buffer("row", torch.zeros(int(used.max()) + 1, dtype=torch.long))
        self.row[used] = torch.arange(len(used))
        self.words = nn.Embedding(len(used), width)
        nn.init.normal_(self.words.weight)
        self.positions = nn.Parameter(torch.randn(ids.shape[1], width))

    def forward(self, ids: torch.Tensor, padding: torch.Tensor, cls_index: torch.Tensor) -> tuple:
        return self.words(self.row[ids]) + self.positions[:ids.shape[1]], padding, cls_index


def text(captions: list[str], args, model) -> tuple:
    """(tokens (B, L, W), padding (B, L), cls index (B,)) of captions: the tower's or random vectors;
    for `words`, the token ids (B, L) in place of the tokens, which `OwnWords` embeds in training."""
    if args.text == "tower":
        return model.encode_text_tokens(model.tokenizer(captions))
    ids = args.tokenizer(captions)
    if args.text == "words":  # kept at full length: OwnWords is built from every set's ids at once
        return ids, ids == 0, ids.argmax(dim=-1)
    ids = ids[:, :int((ids != 0).sum(dim=1).max())]  # no all-padding columns: the same result, faster
    return args.words[ids] + args.positions[:ids.shape[1]], ids == 0, ids.argmax(dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="a fusion checkpoint (for --image tower, --text tower)")
    parser.add_argument("--image", choices=("objects", "regions", "tower", "pixels"), default="objects")
    parser.add_argument("--stage", type=int, help="--image tower: a ResNet stage's feature map instead; --image regions: the stage to pool")
    parser.add_argument("--coords", action="store_true", help="append each patch token's (x, y)")
    parser.add_argument("--text", choices=("random", "words", "tower"), default="random")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW's learning rate (constant)")
    args = parser.parse_args()
    needs_model = args.image in ("regions", "tower") or args.text == "tower"
    if needs_model and not args.checkpoint:
        parser.error("--image regions, --image tower and --text tower need a checkpoint")
    torch.manual_seed(0)
    try:
        model = load_model(args.checkpoint).eval() if needs_model else None
    except (FileNotFoundError, KeyError, ValueError) as err:  # a bad path or file, in one line
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    args.transform = image_transform_v2(PreprocessCfg(**model.preprocess) if model else PreprocessCfg(size=64), False)
    args.tokenizer = model.tokenizer if model else open_clip.get_tokenizer("ViT-B-32")
    draws = torch.Generator().manual_seed(1)  # the random text's fixed vectors, per word and per position
    args.words, args.positions = torch.randn(49409, WIDTH, generator=draws), torch.randn(77, WIDTH, generator=draws)
    train, val = encode(position_swap_pairs(0, 9000), args, model), encode(position_swap_pairs(1, 1500), args, model)
    own_words = OwnWords(torch.cat([data[k][0] for data in (train, val) for k in (1, 2)]), WIDTH) \
        if args.text == "words" else None
    text_width = WIDTH if own_words else train[1][0].shape[2]
    fusion = CrossAttentionFusion(train[0].shape[2], text_width, train[0].shape[1], width=WIDTH, heads=4, layers=2)
    head = ITMHead(WIDTH)
    parameters = [*fusion.parameters(), *head.parameters(), *(own_words.parameters() if own_words else ())]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0)

    def margins(data, rows):
        """ITM match-minus-no-match logits of the true and of the false captions of `rows`."""
        images, *captions = data
        captions = [[x[rows] for x in caption] for caption in captions]
        if own_words:
            captions = [own_words(*caption) for caption in captions]
        logits = [head(fusion(images[rows], *caption).cls) for caption in captions]
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
