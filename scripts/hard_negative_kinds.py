"""Hard-negative accuracy of a checkpoint on the synthetic validation split, by kind of negative.

    python scripts/hard_negative_kinds.py runs/x/checkpoints/last.ckpt

`val/hard_negative_acc` and `val/itm_hard_negative_acc` average over the three kinds that
`vlp.data.synthetic` writes for each two-object validation image (colours swapped, relation
reversed, objects swapped); this splits them, so one can see which kind a model has learned.
The contrastive score is the image-text cosine; with a fusion, the ITM score too (validation's
own rule: the true caption must score strictly higher).
"""
import argparse

import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from vlp.checkpoint import load_model
from vlp.data.boxes import BoxedTransform
from vlp.data.synthetic import render_sample
from vlp.eval.rerank import hard_negative_correct
from vlp.fusion_losses import itm_match_scores

KINDS = ("colours swapped", "relation reversed", "objects swapped")  # vlp.data.synthetic_captions.hard_negatives


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--val-samples", type=int, default=512, help="as written by vlp-synthetic")
    parser.add_argument("--seed", type=int, default=0, help="the dataset seed")
    args = parser.parse_args()
    try:
        model = load_model(args.checkpoint).eval()
    except (FileNotFoundError, KeyError, ValueError) as err:  # a bad path or file, in one line
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    # the boxes, for a fusion that reads region tokens; the others ignore them
    transform = BoxedTransform(image_transform_v2(PreprocessCfg(**model.preprocess), is_train=False), max_boxes=2)
    samples = [render_sample(args.seed, "val", i) for i in range(1, args.val_samples, 2)]  # odd: two objects
    transformed = [transform(image, meta["boxes"]) for image, _, meta in samples]
    images, boxes = (torch.stack(parts) for parts in zip(*transformed))
    with torch.no_grad():
        out = model(images, model.tokenizer([caption for _, caption, _ in samples]), boxes)
        true_cos = (out.image_features * out.text_features).sum(dim=1)
        if model.fusion is not None:
            true_itm = itm_match_scores(model, out.image_tokens, out.text_tokens, out.text_padding,
                                        out.text_cls_index)
        print(f"{len(samples)} two-object validation images, one negative of each kind per image")
        for k, kind in enumerate(KINDS):
            negatives = model.tokenizer([meta["negatives"][k] for _, _, meta in samples])
            cos = (out.image_features * model.encode_text(negatives)).sum(dim=1)
            line = f"{kind:<18} contrastive {hard_negative_correct(true_cos, cos).float().mean():6.1%}"
            if model.fusion is not None:
                itm = itm_match_scores(model, out.image_tokens, *model.encode_text_tokens(negatives))
                line += f"   ITM {hard_negative_correct(true_itm, itm).float().mean():6.1%}"
            print(line)


if __name__ == "__main__":
    main()
