"""The `lockstep` command line: runs the coordinator or an agent, and talks to the coordinator."""
