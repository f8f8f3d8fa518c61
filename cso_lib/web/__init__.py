"""Web browsing environment: a seeded local encyclopedia site, its server, a search tool and browser tools.

`site` generates the pages, `server` serves them on 127.0.0.1, `search` ranks them (BM25), and `browser`
drives Debian's Chromium through Playwright with loopback-only navigation.
"""
