"""Draft training: feature generation, the Jakiro loss, the trainer."""
