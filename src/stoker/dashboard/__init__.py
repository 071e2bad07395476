"""`stoker dashboard`: a web page over run directories, the job queue and `stoker serve` servers.

    from stoker.dashboard import Settings, create_app, dashboard
    dashboard("runs", port=8050, servers=["http://127.0.0.1:8000"])   # blocks; or:
    app = create_app(Settings("runs"))                                 # an ASGI app to serve yourself
"""

from stoker.dashboard.app import Settings, create_app, dashboard

__all__ = ["Settings", "create_app", "dashboard"]
