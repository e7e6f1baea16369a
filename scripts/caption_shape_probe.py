"""Does a caption decoder read an object's shape from the image, or from the colour word before it?

    python scripts/caption_shape_probe.py runs/caption_synthetic/checkpoints/last.ckpt

On single-object images of the synthetic data the decoder reads "a photo of a {colour}" and picks
among the four shape words, for three sets of images:
- held-out (colour, shape) pairs (the validation split), with their true colour;
- training pairs (new images: the train split of the next dataset seed), with their true colour;
- the held-out images again, with another colour word, one seen with the true shape in training.
When the third reads the shape right and the first does not, the image features carry the shape and
the colour word before it overrules them: the decoder's language prior, not its image tower.
"""
import argparse

import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from vlp.checkpoint import load_model
from vlp.data.synthetic import COLOURS, HELDOUT, SHAPES, render_sample
from vlp.models.caption import encode_image_tokens, text_states, vocabulary_logits


def shape_choices(model, images, colours):
    """(N, 4) probabilities of the four shape words after "a photo of a {colour}", among those four."""
    tokens = model.tokenizer([f"a photo of a {colour}" for colour in colours])
    colour_position = (tokens != 0).sum(dim=1) - 2  # the last word, before <end_of_text>
    shape_ids = [int(model.tokenizer([shape])[0, 1]) for shape in SHAPES]
    with torch.no_grad():
        _, image_tokens = encode_image_tokens(model, images)
        _, states = text_states(model, image_tokens, tokens)
        logits = vocabulary_logits(model, states[torch.arange(len(tokens)), colour_position])
    return logits[:, shape_ids].softmax(dim=-1)


def seen_colour_of(shape):
    """A colour seen with `shape` in training."""
    return next(colour for colour in COLOURS if (colour, shape) not in HELDOUT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--images", type=int, default=256, help="images per set")
    parser.add_argument("--seed", type=int, default=0, help="the dataset seed the model trained on")
    args = parser.parse_args()
    try:
        model = load_model(args.checkpoint).eval()
    except (FileNotFoundError, KeyError, ValueError) as err:  # a bad path or file, in one line
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    transform = image_transform_v2(PreprocessCfg(**model.preprocess), is_train=False)
    held_out = [render_sample(args.seed, "val", i) for i in range(0, 2 * args.images, 2)]  # even: one object
    seen = (render_sample(args.seed + 1, "train", i) for i in range(10 * args.images))
    seen = [sample for sample in seen if len(sample[2]["objects"]) == 1][:args.images]
    rows = [("held-out pairs, true colour", held_out, lambda o: o["colour"]),
            ("training pairs, true colour", seen, lambda o: o["colour"]),
            ("held-out pairs, seen colour", held_out, lambda o: seen_colour_of(o["shape"]))]
    for name, samples, colour_of in rows:
        objects = [meta["objects"][0] for _, _, meta in samples]
        images = torch.stack([transform(image) for image, _, _ in samples])
        probs = shape_choices(model, images, [colour_of(o) for o in objects])
        truth = torch.tensor([SHAPES.index(o["shape"]) for o in objects])
        right = (probs.argmax(dim=1) == truth).float().mean()
        p_true = probs[torch.arange(len(truth)), truth].mean()
        print(f"{name:<28} shape right {right:6.1%}   mean p(true shape) {p_true:.2f}   ({len(samples)} images)")


if __name__ == "__main__":
    main()
