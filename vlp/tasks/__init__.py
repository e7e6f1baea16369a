"""Downstream tasks on a VLPModel: one small LightningModule each (Lightning glue, chosen by `task=`)."""
