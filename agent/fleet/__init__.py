"""The motoko agent's side of the fleet: the reports every host sends, kept (``store``) and
served (``api``). Between ``agent.daemon`` (which will run it) and ``agent.node``."""
