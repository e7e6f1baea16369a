"""Zero-shot classification on an ImageNet-style image folder (`root/<class>/<image>`).

Classes are the sub-folders in sorted order (torchvision's `ImageFolder`), so an ImageNet
validation folder laid out by WordNet id lines up with open_clip's IMAGENET_CLASSNAMES.
"""
from pathlib import Path
from typing import Callable, Sequence, Union

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from vlp.eval.zeroshot import zeroshot_classifier, zeroshot_metrics


def image_folder(root: Union[str, Path], transform: Callable, num_classes: int) -> ImageFolder:
    """The labelled images under `root`, checked against the prompt set's number of classes.

    Raises:
        FileNotFoundError: `root` is not a folder.
        ValueError: its number of class folders differs from `num_classes`.
    """
    if not Path(root).is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    dataset = ImageFolder(str(root), transform=transform, allow_empty=True)  # a class may have no image
    if len(dataset.classes) != num_classes:
        raise ValueError(f"{root} has {len(dataset.classes)} class folders but the zero-shot prompts name "
                         f"{num_classes} classes (folders are matched to class names in sorted order)")
    return dataset


@torch.no_grad()
def folder_zeroshot_metrics(model, dataset: ImageFolder, classnames: Sequence[str], templates: Sequence,
                            batch_size: int = 256, num_workers: int = 4, progress: bool = True) -> dict[str, float]:
    """Zero-shot top-1/top-5 of `model` (with `encode_image`, `encode_text`, `tokenizer`) on `dataset`.

    The model is run in eval mode and full precision on its own device, and restored to its mode after.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        classifier = zeroshot_classifier(lambda t: model.encode_text(t.to(device)).float(), model.tokenizer,
                                         classnames, templates)  # (C, D)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                            pin_memory=device.type == "cuda")
        features, labels = [], []
        with torch.autocast(device.type, enabled=False):
            for images, targets in tqdm(loader, desc=f"zero-shot {Path(dataset.root).name}", disable=not progress):
                features.append(model.encode_image(images.to(device)).float())  # (B, D)
                labels.append(targets.to(device))
        metrics = zeroshot_metrics(torch.cat(features), torch.cat(labels), classifier)
    finally:
        model.train(was_training)
    return metrics | {"num_samples": float(len(dataset))}
