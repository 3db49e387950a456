"""massedit.datamodules package."""
