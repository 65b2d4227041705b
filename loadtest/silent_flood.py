# Silent-connection flood for BENCHMARKS.md (issue 17): N sockets that never send a byte,
# spread over IPS loopback source addresses, while timing GET /health/live on new connections.
# Usage: python3 silent_flood.py N PORT IPS
import socket, sys, time, subprocess, os, re, http.client, statistics
N=int(sys.argv[1]); port=int(sys.argv[2]); ips=int(sys.argv[3])
socks=[]; refused=0
t0=time.time()
lat=[]
def health():
    s=time.time()
    try:
        c=http.client.HTTPConnection('127.0.0.1',port,timeout=5); c.request('GET','/health/live'); r=c.getresponse(); r.read(); c.close()
        return (time.time()-s)*1000 if r.status==200 else None
    except Exception: return None
for i in range(N):
    s=socket.socket(); s.setblocking(True)
    s.bind((f'127.0.1.{1+i%ips}',0))
    try: s.connect(('127.0.0.1',port)); socks.append(s)
    except Exception: refused+=1
    if i%500==0: lat.append(health())
open_time=time.time()-t0
during=[health() for _ in range(20)]
ok=[x for x in lat+during if x is not None]
print(f"opened={len(socks)} connect_errors={refused} in {open_time:.1f}s; health probes ok {len(ok)}/{len(lat)+len(during)}; p50={statistics.median(ok):.1f}ms max={max(ok):.1f}ms")
