"""A local plugin whose own code raises while it is imported."""
raise ValueError("this plugin refuses to load")
