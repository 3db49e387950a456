"""massedit.lightning_modules package."""
