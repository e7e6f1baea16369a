from vlp.models.model import VLPModel, VLPOutput
from vlp.models.towers import Towers, open_clip_towers

__all__ = ["VLPModel", "VLPOutput", "Towers", "open_clip_towers"]
