-- wrk script for scenario 4: every request is a POST with a 1 KiB body
-- (wrk adds the Content-Length header itself).
wrk.method = "POST"
wrk.body = string.rep("x", 1024)
wrk.headers["Content-Type"] = "application/octet-stream"
