"""Local test doubles that speak the real wire protocols (Vast.ai's REST API first).

The clients under test are the production clients: they only see a different base URL.
"""
