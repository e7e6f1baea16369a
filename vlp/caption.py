"""`vlp-caption`: captions for images from a captioning checkpoint (`task=caption`).

    vlp-caption runs/coca/checkpoints/last.ckpt photo.jpg more/*.png      # beam search
    vlp-caption CKPT images/ --method top_p --top-p 0.9 --seed 1          # a folder, nucleus sampling
    vlp-caption CKPT 'shards/val-{000000..000003}.tar'                    # webdataset shards

Prints one `<image>\t<caption>` line per image.
"""
import argparse
import io
import sys
from itertools import islice
from pathlib import Path
from typing import Iterator

import torch
import webdataset as wds
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from vlp.checkpoint import load_model
from vlp.data.wds import IMAGE_KEYS, expand_urls
from vlp.models.generate import METHODS, decode, generate

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def images_of(inputs: list[str]) -> Iterator[tuple[str, Image.Image]]:
    """(name, image) for image files, the images in folders, and the images in webdataset shards."""
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            for file in sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                yield str(file), Image.open(file)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            if not path.is_file():
                raise FileNotFoundError(f"no image {spec}")
            yield spec, Image.open(path)
        else:  # shards: a .tar, a brace pattern or a glob
            for sample in wds.tarfile_to_samples()(dict(url=u) for u in expand_urls(spec)):
                key = next((k for k in IMAGE_KEYS.split(";") if k in sample), None)
                if key is not None:
                    yield sample["__key__"], Image.open(io.BytesIO(sample[key]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="vlp-caption", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a vlp-train checkpoint of task=caption")
    parser.add_argument("inputs", nargs="+", help="image files, folders of images, or webdataset shards")
    parser.add_argument("--method", choices=METHODS, default="beam_search")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-len", type=int, default=20, help="tokens, start of text included")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="for top-p sampling")
    args = parser.parse_args(argv)
    try:
        caption_all(args)
    except (FileNotFoundError, KeyError, ValueError) as err:
        sys.exit(f"vlp-caption: {err}")


def caption_all(args: argparse.Namespace) -> None:
    model = load_model(args.checkpoint)
    if "caption" not in model.heads:
        raise ValueError(f"{args.checkpoint} has no caption decoder (model.heads.caption): train it with task=caption")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    transform = image_transform_v2(PreprocessCfg(**model.preprocess), is_train=False)
    generator = torch.Generator(device).manual_seed(args.seed)
    options = dict(max_len=args.max_len, num_beams=args.num_beams, top_p=args.top_p,
                   temperature=args.temperature, generator=generator)
    images = images_of(args.inputs)
    while batch := list(islice(images, args.batch_size)):
        pixels = torch.stack([transform(image.convert("RGB")) for _, image in batch]).to(device)
        for (name, _), caption in zip(batch, decode(generate(model, pixels, args.method, **options))):
            print(f"{name}\t{caption}", flush=True)


if __name__ == "__main__":
    main()
