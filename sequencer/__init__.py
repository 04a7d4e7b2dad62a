"""sequencer: an async test sequencer for factory test and provisioning, built on trio."""
