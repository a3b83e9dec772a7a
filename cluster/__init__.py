"""WHERE a job runs: connecting to Ray, node inventory, gang reservation, worker actors, rank layout."""
