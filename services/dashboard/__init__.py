"""The live web dashboard (`cumulus dashboard`, also started by `cumulus up`).

It reads through the gateway's API as the user of its profile, with the SDK's client, the
same way `cumulus jobs` and `cumulus events` do, so the gateway's per-user permissions apply
as they are, and the browser never holds bus credentials. The page is plain HTML and
JavaScript served from this package (no build step); it updates through Server-Sent Events.
`board` keeps what it shows, `web` serves it, `app` wires them (docs/observability.md).
"""
