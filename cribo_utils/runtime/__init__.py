"""Process-level services shared by training and evaluation: distributed set-up and collectives, logging,
progress bars."""
