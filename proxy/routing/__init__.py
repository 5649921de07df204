"""Step 4: model -> tier, waiting while a sleeping tier wakes, and the forward loop that ties the
wake wait to the upstream retry rule inside one hard cap."""
