import sys, time, httpx, concurrent.futures as cf
url, model, conc, dur = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
prompt = " ".join(["users"]*60)
def one(_):
    n=0; t=time.time()
    with httpx.Client(timeout=60) as c:
        while time.time()-t < dur:
            r=c.post(url+"/v1/completions", json={"model":model,"prompt":prompt,"max_tokens":32,"ignore_eos":True,"temperature":0})
            n+=r.json()["usage"]["completion_tokens"]
    return n
t=time.time()
with cf.ThreadPoolExecutor(conc) as ex: n=sum(ex.map(one, range(conc)))
print(f"{model} c={conc}: {n/(time.time()-t):.1f} tok/s")
