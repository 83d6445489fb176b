"""Where a job's overhead goes, from a `perf record -g` of an agent and its owners.

    perf_breakdown.py PERF_SCRIPT_OUTPUT JOBS [both]

PERF_SCRIPT_OUTPUT is `perf script -F comm,tid,ip,sym,dso` of a `perf record -g -F 1999`
(each sample is 1/1999 s of CPU). Each sample goes to its process (agent, job owner, job: by
command name) and to one kind of work: the system call it was in (by the kernel frame
`__x64_sys_*`), a page fault, or the user-space code at the top of its stack (TLS and
signing, the AWS SDK, tokio, the allocator, ...). Prints ms per job for each. With `both`:
also agent + owner together, and their time by system call. Written for `make
bench-profile` (tests/bench/profile.sh).
"""
import collections
import re
import sys

USER=[('TLS and SigV4 signing (aws-lc, sigv4)',r'aws_lc|sha256|SHA256|hmac|HMAC|aes_|gcm|ecp_|bn_|rustls|aws_sigv4'),
 ('AWS SDK, HTTP (smithy, hyper)',r'aws_smithy|aws_sdk|hyper|http::|aws_config|aws_runtime|h2::'),
 ('async runtime (tokio)',r'tokio::'),
 ('allocator',r'malloc|_int_free|cfree|realloc|_int_|unlink_chunk|free$'),
 ('JSON, formatting, logging',r'serde|core::fmt|json|tracing'),
 ('dynamic loading, libc start-up',r'_dl_|do_lookup_x|check_match|handle_amd|init_cpu_features|_dl_start|cpuid|__libc_start|__libc_early_init|_dl_relocate'),
]
SYSGROUP=[('fsync, fdatasync',r'^(fsync|fdatasync)$'),
 ('exec',r'^(execve|execveat)$'),
 ('fork, clone, spawn',r'^(clone|clone3|fork|vfork)$'),
 ('exit, wait, reap',r'^(exit|exit_group|wait4|waitid)$'),
 ('files: open, rename, unlink, mkdir, write, read',r'^(openat|open|rename|renameat|renameat2|unlink|unlinkat|mkdir|mkdirat|write|writev|pwrite64|read|pread64|newfstatat|statx|close|getdents64|lseek|fcntl|ftruncate|readlink|readlinkat|access|faccessat2|chdir|fchmod|fchmodat)$'),
 ('sockets: connect, send, recv, accept, poll',r'^(connect|socket|sendto|sendmsg|recvfrom|recvmsg|accept|accept4|bind|listen|setsockopt|getsockopt|shutdown|getpeername|getsockname|poll|ppoll|epoll_wait|epoll_ctl|epoll_pwait|select|pselect6)$'),
 ('memory: mmap, munmap, brk, mprotect',r'^(mmap|munmap|brk|mprotect|madvise|mremap)$'),
 ('signals, futex, scheduling',r'^(futex|rt_sigaction|rt_sigprocmask|rt_sigreturn|sched_yield|nanosleep|clock_nanosleep|kill|tgkill|signalfd4|sigaltstack)$'),
]
def role(comm):
    if comm.startswith('rsql-job-own') or comm=='rsql-spawner': return 'owner'
    if comm.startswith('bench_'): return 'job'
    return 'agent'
def classify(frames):
    for sym in frames:
        m=re.match(r'(?:__x64_sys_|__do_sys_|__se_sys_|__ia32_sys_)(\w+)',sym)
        if m:
            name=m.group(1)
            for g,p in SYSGROUP:
                if re.match(p,name): return 'kernel: '+g
            return 'kernel: other syscalls ('+name+')'
    top=frames[0] if frames else ''
    if any('asm_exc_page_fault' in f or 'exc_page_fault' in f for f in frames): return 'kernel: page faults'
    for g,p in USER:
        if any(re.search(p,f) for f in frames[:8]): return 'user: '+g
    if frames and re.search(r'ret_from_fork|schedule_tail|finish_task_switch',' '.join(frames)): return 'kernel: scheduling, fork return'
    if frames and all(re.match(r'^[a-z_0-9.]+$',f) for f in frames[:1]) and any('kernel' in f for f in frames): return 'kernel: other'
    return 'user: other'
def parse(path):
    samples=[]; comm=None; frames=[]; kern=[]
    for line in open(path):
        if not line.strip():
            if comm is not None: samples.append((comm,frames))
            comm=None; frames=[]; continue
        if not line.startswith('\t') and not line.startswith(' '*4):
            comm=line.split()[0]; frames=[]; continue
        m=re.match(r'\s+[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$',line)
        if m:
            sym=re.sub(r'\+0x[0-9a-f]+$','',m.group(1)); dso=m.group(2)
            frames.append(sym if 'kernel' not in dso else sym)
    if comm is not None: samples.append((comm,frames))
    return samples
if len(sys.argv) < 3:
    sys.exit(__doc__)
jobs=int(sys.argv[2]); period_ms=1000/1999
res=collections.defaultdict(collections.Counter)
for comm,frames in parse(sys.argv[1]):
    res[role(comm)][classify(frames)]+=1
for r in ['agent','owner','job']:
    tot=sum(res[r].values())
    print(f'{r}: {tot*period_ms/jobs:.2f} ms/job sampled')
    for k,v in res[r].most_common(14):
        print(f'   {v*period_ms/jobs:6.2f}  {k}')

if len(sys.argv) > 3:
    both=collections.Counter(); sysc=collections.Counter()
    for comm,frames in parse(sys.argv[1]):
        if role(comm)=='job': continue
        c=classify(frames); both[c]+=1
        for f in frames:
            m=re.match(r'(?:__x64_sys_|__do_sys_)(\w+)',f)
            if m: sysc[m.group(1)]+=1; break
    print('agent+owner:', f'{sum(both.values())*period_ms/jobs:.2f}')
    for k,v in both.most_common(): print(f'   {v*period_ms/jobs:6.2f}  {k}')
    print('by syscall:')
    for k,v in sysc.most_common(16): print(f'   {v*period_ms/jobs:6.2f}  {k}')
