"""Draft training (DESIGN.md §8): feature generation, the Jakiro loss, the trainer."""
