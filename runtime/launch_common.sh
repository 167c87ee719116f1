# Shared by the classification / detection / segmentation launchers.  Source it, don't run it.
#
#   source "$(dirname "$0")/../runtime/launch_common.sh"
#
# Environment knobs (all optional):
#   NNODES, NODE_RANK, MASTER_ADDR               multi-node torchrun (defaults: 1, 0, 127.0.0.1);
#                                                with NNODES>1, MASTER_ADDR (node 0's address) is required
#   MASTER_PORT                                  the rendezvous port, honoured by every launcher: it
#                                                overrides a launcher's port argument (the seed's
#                                                commands give one); without either, a free port
#   PACAVIT_YES=1                                confirm deleting an old experiment (same as --yes)
#   PYTHON                                       interpreter (default: the repo's .venv if present)
#   PACAVIT_DEVICE=cpu                           force the CPU path even where CUDA is available

PACAVIT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# how this launcher was started, recorded in the run's lock for anyone who finds the run busy
PACA_COMMAND="$0 $*"

paca_die() {
    echo "error: $*" >&2
    exit 2
}

# The interpreter: $PYTHON, else the repo's virtualenv, else python3 on PATH.
paca_python() {
    if [[ -n "${PYTHON:-}" ]]; then
        echo "$PYTHON"
    elif [[ -z "${VIRTUAL_ENV:-}" && -z "${CONDA_PREFIX:-}" && -x "$PACAVIT_ROOT/.venv/bin/python" ]]; then
        echo "$PACAVIT_ROOT/.venv/bin/python"
    else
        command -v python3 || command -v python
    fi
}

# Split "$@" into PACA_ARGS (passed on to Python) and the launcher's own --yes flag.
paca_take_flags() {
    PACA_ARGS=()
    for arg in "$@"; do
        if [[ "$arg" == "--yes" || "$arg" == "-y" ]]; then
            PACAVIT_YES=1
        else
            PACA_ARGS+=("$arg")
        fi
    done
}

# paca_help_of SCRIPT: when [others] hold -h / --help, print the options of the script they go to
# and exit, before anything is checked or made (no run folder).
paca_help_of() {
    local arg
    for arg in "${PACA_ARGS[@]}"; do
        if [[ "$arg" == -h || "$arg" == --help ]]; then
            exec "$(paca_python)" "$1" --help
        fi
    done
}

# Delete an old experiment folder only when confirmed by --yes / PACAVIT_YES=1.  Launchers never
# prompt: without the confirmation they stop and say how to go on, on a terminal or in a batch job.
# The folder's lock files stay: this launcher holds them.
paca_confirm_remove() {
    local dir="$1"
    paca_run_has_content "$dir" || return 0
    [[ "${PACAVIT_YES:-0}" == "1" ]] ||
        paca_die "$dir exists and Remove_old=1: pass --yes (or set PACAVIT_YES=1) to delete it, or Remove_old=0 to keep it"
    echo "removing old experiment $dir (confirmed by --yes / PACAVIT_YES=1)"
    find "$dir" -mindepth 1 -maxdepth 1 ! -name "$PACA_LOCK" ! -name "$PACA_WORKERS_LOCK" -exec rm -rf -- {} +
}

# paca_check_name LABEL VALUE: a run-name part (Dataset_name, Exp_name, Tag) becomes one folder
# name, so it may hold no '/'.  A trailing slash (from tab completion) is dropped.  The checked
# name is left in PACA_NAME.
paca_check_name() {
    local label="$1" value="$2"
    while [[ "$value" == */ ]]; do value="${value%/}"; done
    [[ -n "$value" ]] || paca_die "$label is empty (got '$2')"
    [[ "$value" != "." && "$value" != ".." ]] || paca_die "$label cannot be '$value'"
    [[ "$value" != */* ]] ||
        paca_die "$label '$2' contains '/': it names one folder of the run, not a path; use e.g. '${value//\//_}'"
    PACA_NAME="$value"
}

# ---------------------------------------------------------------------------------------------
# One launcher per run folder.  The launcher holds an exclusive flock on DIR/.launcher.lock for
# its lifetime; torchrun inherits the open file, so the lock lasts while torchrun lives.  torchrun
# does not pass the file on to its workers, so each worker holds a shared flock on
# DIR/.workers.lock (PACAVIT_RUN_LOCK names it): workers orphaned by a killed launcher still
# keep a new launch out.  The kernel drops a flock when its last holder dies, so a lock left by
# dead processes never blocks.
PACA_LOCK=".launcher.lock"
PACA_WORKERS_LOCK=".workers.lock"

# True when DIR holds anything besides the lock files.
paca_run_has_content() {
    [[ -d "$1" ]] && [[ -n "$(find "$1" -mindepth 1 -maxdepth 1 ! -name "$PACA_LOCK" ! -name "$PACA_WORKERS_LOCK" -print -quit)" ]]
}

# "pid (command)" of every process that has FILE open, except this shell.
_paca_lock_holders() {
    local file pid
    file="$(readlink -f "$1")"
    for pid in $(find /proc/[0-9]*/fd -lname "$file" 2>/dev/null | cut -d/ -f3 | sort -un); do
        [[ "$pid" == "$$" ]] && continue
        echo "  pid $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)"
    done
}

# paca_lock_run DIR: take the run folder (creating it) or stop at once, naming who has it.
paca_lock_run() {
    local dir="$1" lock="$1/$PACA_LOCK" workers="$1/$PACA_WORKERS_LOCK" fd
    mkdir -p "$dir"
    exec {PACA_LOCK_FD}<>"$lock"
    # a few seconds' grace: the kernel releases a killed process's flock shortly after it is gone
    if ! flock -w 3 "$PACA_LOCK_FD"; then
        local owner
        owner="$(cat "$lock" 2>/dev/null)"
        exec {PACA_LOCK_FD}>&-
        paca_die "$dir is in use by another launcher (${owner:-details not written yet}); its processes:
$(_paca_lock_holders "$lock")
Wait for it to finish, or stop it (kill PID) before starting this run again."
    fi
    exec {fd}<>"$workers"
    if ! flock -w 3 "$fd"; then
        exec {fd}>&-
        paca_die "training processes of an earlier launch of $dir are still running (their launcher has exited):
$(_paca_lock_holders "$workers")
Stop them (kill PID) before starting this run again."
    fi
    exec {fd}>&-
    printf 'pid %s on %s, started %s: %s\n' "$$" "${HOSTNAME:-$(uname -n)}" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$PACA_COMMAND" >"$lock"
    export PACAVIT_RUN_LOCK="$workers"
}

# paca_resume_point TASK DIR: the checkpoint a resume of DIR would start from, for the launcher's
# last message only: the run's processes choose it themselves (rank 0, runtime/run_folder.py).
paca_resume_point() {
    "$(paca_python)" -m runtime.run_folder resume-point "$1" "$2"
}

# Several nodes: every node's torchrun meets node 0 at MASTER_ADDR.  The single-node default
# 127.0.0.1 would have each node wait for itself until killed, so it must be given.
paca_check_nodes() {
    local nnodes="${NNODES:-1}" node_rank="${NODE_RANK:-0}"
    [[ "$nnodes" =~ ^[0-9]+$ && "$nnodes" -ge 1 ]] || paca_die "NNODES must be a positive integer, got '$nnodes'"
    [[ "$node_rank" =~ ^[0-9]+$ && "$node_rank" -lt "$nnodes" ]] ||
        paca_die "NODE_RANK must be 0..$((nnodes - 1)) with NNODES=$nnodes, got '$node_rank'"
    (( nnodes == 1 )) || [[ -n "${MASTER_ADDR:-}" ]] ||
        paca_die "NNODES=$nnodes needs MASTER_ADDR: set it on every node to node 0's address (e.g. MASTER_ADDR=\$(hostname -i) on node 0); the single-node default 127.0.0.1 would leave each node waiting for itself"
    (( nnodes == 1 )) || paca_rendezvous_timeout
}

# paca_cuda_devices GPUS NB_GPUS: the CUDA_VISIBLE_DEVICES of the run.  GPUS lists device
# numbers; a CUDA_VISIBLE_DEVICES inherited from the job (SLURM sets it to the GPUs it allocated)
# is kept, and GPUS then counts within it, so a job never reaches a GPU it was not given.
paca_cuda_devices() {
    local gpus="$1" nb_gpus="$2" index allowed=() wanted=() chosen=()
    IFS=, read -ra wanted <<<"$gpus"
    (( nb_gpus <= ${#wanted[@]} )) ||
        paca_die "Nb_gpus=$nb_gpus but gpus '$gpus' lists ${#wanted[@]} device(s): list at least $nb_gpus GPUs or lower Nb_gpus"
    if [[ -z "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        echo "$gpus"
        return
    fi
    IFS=, read -ra allowed <<<"$CUDA_VISIBLE_DEVICES"
    for index in "${wanted[@]}"; do
        (( index < ${#allowed[@]} )) ||
            paca_die "gpus '$gpus' names GPU $index, but this job may use only CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES (${#allowed[@]} GPU(s), set by SLURM or your shell); gpus counts within them: use 0..$((${#allowed[@]} - 1))"
        chosen+=("${allowed[index]}")
    done
    (IFS=,; echo "${chosen[*]}")
}

# Choose devices from the launcher's Gpus / Nb_gpus arguments.  Sets PACA_NPROC and
# PACA_DEVICE (cuda|cpu); on CUDA also CUDA_VISIBLE_DEVICES.  Without CUDA it falls back to
# CPU processes (gloo backend) instead of failing; PACAVIT_DEVICE=cpu hides the GPUs from the
# processes, so nothing of the run (NCCL, SyncBN, mmengine's device choice) lands on them.
# Where the driver shows GPUs that torch cannot use it stops instead (runtime/gpu_check.py names
# the fix); a third argument, mmcv-ops, also stops a CUDA run whose mmcv has CPU ops only.
paca_select_devices() {
    local gpus="$1" nb_gpus="$2" py usable=cpu
    [[ "$nb_gpus" =~ ^[0-9]+$ && "$nb_gpus" -ge 1 ]] || paca_die "Nb_gpus must be a positive integer, got '$nb_gpus'"
    # on CPU-only hosts too: a command that works here must work on the GPU cluster
    [[ "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]] || paca_die "gpus must list device numbers like 0,1,2,3, got '$gpus'"
    paca_check_nodes
    py="$(paca_python)"
    if [[ "${PACAVIT_DEVICE:-}" != "cpu" ]]; then
        usable="$("$py" "$PACAVIT_ROOT/runtime/gpu_check.py" device ${3:+--mmcv-ops})" || exit 2
    fi
    if [[ "$usable" == cuda ]]; then
        CUDA_VISIBLE_DEVICES="$(paca_cuda_devices "$gpus" "$nb_gpus")" || exit 2
        export CUDA_VISIBLE_DEVICES
        PACA_DEVICE=cuda
    else
        if [[ "${PACAVIT_DEVICE:-}" == "cpu" ]]; then
            echo "note: PACAVIT_DEVICE=cpu; running $nb_gpus CPU process(es) with the gloo backend, GPUs hidden"
            export CUDA_VISIBLE_DEVICES=""
        elif [[ -n "${CUDA_VISIBLE_DEVICES+set}" && ! "${CUDA_VISIBLE_DEVICES%%,*}" =~ ^[[:space:]]*([0-9]+|GPU-|MIG-) ]]; then
            echo "note: CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES' names no GPU (set by your shell or scheduler); running $nb_gpus CPU process(es) with the gloo backend"
        else
            echo "note: no CUDA device visible; running $nb_gpus CPU process(es) with the gloo backend"
        fi
        PACA_DEVICE=cpu
        # share the cores between the processes instead of oversubscribing them
        local cores
        cores="$(nproc 2>/dev/null || echo 1)"
        export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / nb_gpus > 0 ? cores / nb_gpus : 1 ))}"
        # idle OpenMP threads sleep instead of spinning: on a shared CPU spinning threads steal
        # the cores the working ones need (measured: a 2.1 s step took 13-20 s)
        if [[ -z "${OMP_WAIT_POLICY:-}" ]]; then
            export OMP_WAIT_POLICY=PASSIVE PACA_CHOSE_PASSIVE=1
        fi
    fi
    PACA_NPROC="$nb_gpus"
    export PACA_DEVICE
}

# For a job whose processes never run at the same time (benchmark.sh: one measures while the
# others wait): OpenMP's default waiting (a brief spin, then sleep) instead of the passive waiting
# that paca_select_devices chose; a policy the user set stays.  Passive waiting wakes the threads
# for every parallel region: it cost every model about a fifth of its throughput here.
paca_default_omp_waiting() {
    if [[ -n "${PACA_CHOSE_PASSIVE:-}" ]]; then
        unset OMP_WAIT_POLICY PACA_CHOSE_PASSIVE
    fi
}

# The processes' stderr on its way to the terminal, line by line, without the traceback torchrun
# prints when a signal stops it (the launcher says what happened instead); its error and exception
# lines are copied to FILE for paca_training_failed.  It ignores SIGTERM/SIGINT so that it outlives
# the processes it reports on.
_paca_stderr_filter() {
    { set +ex; } 2>/dev/null  # the launcher traces the torchrun command, not this filter
    trap '' TERM INT HUP
    local copy="$1" line traceback=()
    while IFS= read -r line || [[ -n "$line" ]]; do
        if [[ "$line" == "Traceback (most recent call last):" ]]; then
            _paca_emit "$copy" "${traceback[@]}"
            traceback=("$line")
        elif (( ${#traceback[@]} )); then
            traceback+=("$line")
            # the exception line ends the traceback; an empty line does not (Python prints one
            # for a frame stopped on some statements, e.g. torchrun's when SIGTERM arrives)
            if [[ -n "$line" && "$line" != [[:space:]]* ]]; then
                [[ "$line" == *SignalException* ]] || _paca_emit "$copy" "${traceback[@]}"
                traceback=()
            fi
        else
            _paca_emit "$copy" "$line"
        fi
    done
    _paca_emit "$copy" "${traceback[@]}"
}

_paca_emit() {  # _paca_emit FILE LINE...: print the lines, copy the error and exception ones
    local copy="$1" line
    # torchrun may prefix a worker's lines with its rank ("[rank1]: RuntimeError: ...")
    local error='(^|: )error: ' exception='^(\[rank[0-9]+\]: ?)?[A-Za-z_][A-Za-z0-9_.]*(Error|Exception|Interrupt)(: |$)'
    shift
    for line in "$@"; do
        printf '%s\n' "$line" >&2
        if [[ "$line" =~ $error || "$line" =~ $exception ]]; then
            printf '%s\n' "$line" >>"$copy"
        fi
    done
}

# paca_rendezvous_port PORT: MASTER_PORT if set, else PORT (a launcher's port argument), else a
# free port of this machine; checked to be a TCP port number.  Several nodes must name it: each
# would pick a different free port and wait at it for the others forever.
paca_rendezvous_port() {
    local port="${MASTER_PORT:-${1:-}}" origin="port argument"
    [[ -n "${MASTER_PORT:-}" ]] && origin=MASTER_PORT
    if [[ -z "$port" ]]; then
        (( ${NNODES:-1} == 1 )) ||
            paca_die "NNODES=$NNODES needs one rendezvous port for all nodes: set MASTER_PORT (e.g. MASTER_PORT=29500) on every node, or the launcher's Port argument where it has one; a free port chosen by each node would differ between them"
        port="$(paca_free_port)"
    fi
    [[ "$port" =~ ^[0-9]+$ ]] && (( port >= 1 && port <= 65535 )) ||
        paca_die "$origin must be a TCP port number (1-65535), got '$port'"
    echo "$port"
}

# paca_rendezvous_timeout: how long the nodes of a run wait for one another to start, in seconds
# (PACAVIT_RENDEZVOUS_TIMEOUT, default 600: torchrun's own), left in PACA_RENDEZVOUS_TIMEOUT.  A
# node that never comes (node 0 failed before it started) then stops the others with
# paca_rendezvous_hint's words instead of leaving them waiting.
paca_rendezvous_timeout() {
    PACA_RENDEZVOUS_TIMEOUT="${PACAVIT_RENDEZVOUS_TIMEOUT:-600}"
    [[ "$PACA_RENDEZVOUS_TIMEOUT" =~ ^[0-9]+$ ]] && (( PACA_RENDEZVOUS_TIMEOUT >= 1 )) ||
        paca_die "PACAVIT_RENDEZVOUS_TIMEOUT must be a number of seconds (at least 1), got '$PACA_RENDEZVOUS_TIMEOUT'"
}

# paca_rendezvous_hint CAUSE: what to do when CAUSE (the workers' last exception) says the nodes
# did not all meet: torchrun's static rendezvous times out connecting to node 0, or node 0 waiting
# for the others.  Prints nothing for any other cause.
paca_rendezvous_hint() {
    (( ${NNODES:-1} > 1 )) || return 0
    [[ "$1" =~ (timed\ out|Timed\ out).*(trying\ to\ connect|waiting\ for\ clients) ]] || return 0
    echo "the $NNODES nodes did not all start within ${PACA_RENDEZVOUS_TIMEOUT:-600} s (PACAVIT_RENDEZVOUS_TIMEOUT): launch every node, NODE_RANK 0 to $((NNODES - 1)), with the same MASTER_ADDR and MASTER_PORT (node 0 at MASTER_ADDR=$MASTER_ADDR)" >&2
}

# torchrun over a script: paca_torchrun PORT script.py args...  PORT may be empty (see
# paca_rendezvous_port; MASTER_PORT wins).  Its stderr is kept in PACA_TORCHRUN_LOG.
# torchrun runs in a session of its own and the launcher passes signals on to it, once and as
# SIGTERM, the stop that the workers save from: whether the signal came to the launcher alone
# (docker stop, kill PID, a scheduler signalling the job's first process) or to its whole process
# group (Ctrl-C, kill -- -PGID), and for SIGINT and SIGHUP too (torchrun would hand SIGINT to
# its workers, who would stop without saving).  The signal is left in PACA_STOPPED_BY.
paca_torchrun() {
    local port="$1" script="$2"
    shift 2
    local py rc
    py="$(paca_python)"
    port="$(paca_rendezvous_port "$port")" || exit 2
    # one node meets itself: a MASTER_ADDR inherited from the shell or the scheduler (another job's
    # node 0) would have torchrun wait there for a rendezvous that never comes
    local master_addr=127.0.0.1 rendezvous=()
    if (( ${NNODES:-1} > 1 )); then
        master_addr="$MASTER_ADDR"
        paca_rendezvous_timeout
        rendezvous=(--rdzv-conf "timeout=$PACA_RENDEZVOUS_TIMEOUT")
        echo "note: node ${NODE_RANK:-0} of $NNODES waits for the others at $master_addr:$port for up to $PACA_RENDEZVOUS_TIMEOUT s (PACAVIT_RENDEZVOUS_TIMEOUT); if a node fails before it starts, stop the waiting ones (Ctrl-C) and launch all again"
    fi
    [[ -n "${OMP_NUM_THREADS:-}" ]] || export OMP_NUM_THREADS=1
    PACA_TORCHRUN_LOG="$(mktemp "${TMPDIR:-/tmp}/pacavit-torchrun.XXXXXX")"
    PACA_TORCHRUN_PID_FILE="$(mktemp "${TMPDIR:-/tmp}/pacavit-torchrun-pid.XXXXXX")"
    trap 'rm -f -- "$PACA_TORCHRUN_LOG" "$PACA_TORCHRUN_PID_FILE"' EXIT
    PACA_STOPPED_BY=""
    trap '_paca_pass_on SIGTERM' TERM
    trap '_paca_pass_on SIGINT' INT
    trap '_paca_pass_on SIGHUP' HUP
    set -x
    {
        # this waiting shell outlives a signal to the launcher's group; torchrun gets it from the trap
        trap '' TERM INT HUP
        set -o pipefail
        # a pipeline member is no process group leader, so setsid makes this very process torchrun
        ( trap - TERM INT HUP
          echo "$BASHPID" >"$PACA_TORCHRUN_PID_FILE"
          exec setsid "$py" -m torch.distributed.run \
            --nnodes="${NNODES:-1}" \
            --node_rank="${NODE_RANK:-0}" \
            --nproc_per_node="$PACA_NPROC" \
            --master_addr="$master_addr" \
            --master_port="$port" \
            "${rendezvous[@]}" \
            "$script" "$@" ) 2>&1 1>&3 3>&- | _paca_stderr_filter "$PACA_TORCHRUN_LOG"
    } 3>&1 &
    { local job=$!; set +x; } 2>/dev/null
    # a trapped signal ends `wait` early: wait again until torchrun and the filter are done
    while wait "$job"; rc=$?; kill -0 "$job" 2>/dev/null; do :; done
    trap - TERM INT HUP
    return $rc
}

_paca_pass_on() {  # _paca_pass_on SIGNAL: note it, and stop torchrun with SIGTERM (once)
    { [[ -n "$PACA_STOPPED_BY" ]] && return
      PACA_STOPPED_BY="$1"
      local pid
      pid="$(cat "$PACA_TORCHRUN_PID_FILE" 2>/dev/null)"
      [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null || true; } 2>/dev/null
}

_paca_failure_cause() {  # the workers' last exception in PACA_TORCHRUN_LOG, not torchrun's report of their failure
    grep -aE '^(\[rank[0-9]+\]: ?)?[A-Za-z_][A-Za-z0-9_.]*(Error|Exception|Interrupt)(: |$)' "$PACA_TORCHRUN_LOG" |
        grep -v '^torch\.distributed\.elastic\.' | tail -n 1 || true
}

# paca_training_failed TASK DIR RESUME_HINT: the launcher's last word on a training that
# stopped early (exits).  The resume hint follows only a stop that a resume continues (a
# signal, a crash after a checkpoint); a reported `error:` (bad option, dataset, full disk)
# would stop a resumed run the same way, so it is repeated instead, below torchrun's report.
paca_training_failed() {
    local task="$1" dir="$2" resume_hint="$3" error cause point
    point="$(paca_resume_point "$task" "$dir" 2>/dev/null || true)"
    if [[ -n "$PACA_STOPPED_BY" ]]; then
        if [[ -n "$point" ]]; then
            echo "stopped by $PACA_STOPPED_BY: $dir is kept, with $(basename "$point") to resume from: $resume_hint" >&2
        else
            echo "stopped by $PACA_STOPPED_BY before the run's first checkpoint: launch it again" >&2
        fi
        _paca_signal_exit
    fi
    error="$(grep -aoE '(^|: )error: .*' "$PACA_TORCHRUN_LOG" | tail -n 1 | sed 's/^: //' || true)"
    if [[ -n "$error" ]]; then
        echo "training failed: $error" >&2
        echo "$dir is kept, but a resume would stop the same way: fix the cause and launch again" >&2
        exit 1
    fi
    cause="$(_paca_failure_cause)"
    if [[ -n "$point" ]]; then
        echo "training stopped before the end${cause:+ ($cause)}; $dir is kept: $resume_hint" >&2
    else
        echo "training failed before its first checkpoint${cause:+: $cause}; fix the cause above and launch again" >&2
    fi
    paca_rendezvous_hint "$cause"
    exit 1
}

# paca_evaluation_failed RC: the launcher's last word on an evaluation (validate / test) that did
# not finish (exits with RC).  A signal gets one line of its own, and a reported `error:` (bad
# checkpoint, dataset) is repeated below torchrun's report of the failed worker: an evaluation
# keeps nothing to resume from, it is launched again.
paca_evaluation_failed() {
    local rc="$1" error
    if [[ -n "$PACA_STOPPED_BY" ]]; then
        echo "stopped by $PACA_STOPPED_BY: the evaluation did not finish; launch it again" >&2
        _paca_signal_exit
    fi
    error="$(grep -aoE '(^|: )error: .*' "$PACA_TORCHRUN_LOG" | tail -n 1 | sed 's/^: //' || true)"
    [[ -n "$error" ]] && echo "evaluation failed: $error" >&2
    paca_rendezvous_hint "$(_paca_failure_cause)"
    exit "$rc"
}

_paca_signal_exit() {  # the exit status of a process stopped by $PACA_STOPPED_BY: 128 + its number
    [[ "$PACA_STOPPED_BY" == SIGINT ]] && exit 130
    exit 143
}

# ---------------------------------------------------------------------------------------------
# The run folder's life, the same for the three training launchers (runtime/run_folder.py is the
# Python side).  Its path is paca_run_dir's; training's rank 0 writes FINISHED into it when
# training returns, whether a launcher or a plain `python` started it.  paca_prepare_experiment
# DIR REMOVE_OLD [RESUME] never touches a finished run (Remove_old=0: nothing to do, exit 0;
# Remove_old=1: refused), takes the folder's lock, deletes an unfinished one on Remove_old=1 (with
# --yes), and keeps it otherwise: RESUME=1 (the default) continues it, RESUME=0 refuses a folder
# that holds anything.  Which checkpoint to resume from is decided by the processes' rank 0 and
# shared with every rank of every node.  On several nodes sharing the folder, node 0 alone locks
# and removes it; the others leave it as it is.  A run that the official code (or this repository
# before the FINISHED mark) moved to <Exp_name>/TrainingFinished/<name>/ counts as finished too.
PACA_FINISHED_MARK="FINISHED"

# paca_run_dir TASK EXP_NAME SUBJECT TAG: <work_dirs>/<task>/<Exp_name>/<subject>_<Tag>, the
# layout of runtime.run_folder.run_folder_path.
paca_run_dir() {
    echo "${PACAVIT_WORK_DIRS:-$PACAVIT_ROOT/work_dirs}/$1/$2/$3_$4"
}

paca_prepare_experiment() {
    local dir="$1" remove_old="$2" resume="${3:-1}"
    [[ "$remove_old" == [01] ]] || paca_die "Remove_old_if_exist must be 0 or 1, got '$remove_old'"
    [[ "$resume" == [01] ]] || paca_die "Resume_or_not_if_exist must be 0 or 1, got '$resume'"
    if [[ -e "$dir/$PACA_FINISHED_MARK" ]]; then
        [[ "$remove_old" == 1 ]] && paca_die "$dir is a finished experiment and is never retrained or overwritten: choose another Exp_name/Tag, or delete it by hand to train again"
        echo "$dir is a finished experiment; nothing to do (a finished run is never retrained)"
        exit 0
    fi
    local moved
    moved="$(dirname "$dir")/TrainingFinished/$(basename "$dir")"
    if [[ -d "$moved" ]]; then
        [[ "$remove_old" == 1 ]] && paca_die "$moved is this run, finished and moved there by the official code's layout; it is never retrained or overwritten: choose another Exp_name/Tag, or delete it by hand to train again"
        echo "$dir was trained to the end and moved to $moved (the official code's layout); nothing to do (a finished run is never retrained)"
        exit 0
    fi
    if [[ "${NODE_RANK:-0}" != 0 ]]; then
        export PACAVIT_RUN_LOCK="$dir/$PACA_WORKERS_LOCK"
        return
    fi
    paca_lock_run "$dir"
    if [[ "$remove_old" == 1 ]]; then
        paca_confirm_remove "$dir"
    elif [[ "$resume" == 0 ]] && paca_run_has_content "$dir"; then
        paca_die "$dir exists: pass Resume=1 to continue it or Remove_old=1 to start over"
    fi
}

# paca_training_done DIR: the launcher's last word on a training that returned.
paca_training_done() {
    local dir="$1"
    if [[ "${NODE_RANK:-0}" != 0 ]]; then
        echo "node ${NODE_RANK} done; node 0 marks $dir finished"
    elif [[ -e "$dir/$PACA_FINISHED_MARK" ]]; then
        echo "training finished: $dir"
    else
        # not an error of its own: the next launch resumes the run (e.g. a torchrun stand-in in a test)
        echo "warning: training returned but did not mark $dir $PACA_FINISHED_MARK; a relaunch resumes it" >&2
    fi
}

# A free TCP port on this machine: the default rendezvous port of single-node runs that take no
# Port argument, so several of them can run side by side.
paca_free_port() {
    "$(paca_python)" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

# The OpenMMLab launchers (detection/ and segmentation/) differ only in their task folder.
# A config path is taken relative to the working directory, else to the task folder.
_paca_task_config() {
    PACA_CONFIG="$1"
    [[ -f "$PACA_CONFIG" ]] || PACA_CONFIG="$PACAVIT_ROOT/$2/$1"
    [[ -f "$PACA_CONFIG" ]] || paca_die "config not found: $1 (relative to $(pwd) or $PACAVIT_ROOT/$2)"
}

# paca_check_openmmlab_command train|test TASK ARGS...: the entry's own checks of its arguments and
# config (runtime/openmmlab_args.py: options, --cfg-options, dataset folders; no torch, about a
# second), so that a mistake is one error line before a run folder is made or torchrun starts.
paca_check_openmmlab_command() {
    "$(paca_python)" -m runtime.openmmlab_args "$@" || exit 2
}

# paca_openmmlab_train TASK ENTRY.py Relative_config_filename Remove_old_if_exist_0_or_1 Exp_name Tag gpus nb_gpus port [others]
paca_openmmlab_train() {
    local task="$1" entry="$2"
    shift 2
    [[ $# -ge 7 ]] || paca_die "usage: $(basename "$0") Relative_config_filename Remove_old_if_exist_0_or_1 Exp_name Tag gpus nb_gpus port [others]"
    local remove_old="$2" exp="$3" tag="$4" gpus="$5" nb_gpus="$6" port="$7"
    paca_check_name Exp_name "$exp" && exp="$PACA_NAME"
    paca_check_name Tag "$tag" && tag="$PACA_NAME"
    _paca_task_config "$1" "$task"
    shift 7
    paca_take_flags "$@"
    paca_help_of "$PACAVIT_ROOT/$task/$entry"
    local work_dir
    paca_check_nodes
    work_dir="$(paca_run_dir "$task" "$exp" "$(basename "$PACA_CONFIG" .py)" "$tag")"
    paca_check_openmmlab_command train "$task" "$PACA_CONFIG" --work-dir "$work_dir" "${PACA_ARGS[@]}"
    paca_prepare_experiment "$work_dir" "$remove_old"
    paca_select_devices "$gpus" "$nb_gpus" mmcv-ops
    # train_main resumes from the work dir's newest intact checkpoint by itself (rank 0 picks it)
    if ! paca_torchrun "$port" "$PACAVIT_ROOT/$task/$entry" "$PACA_CONFIG" --work-dir "$work_dir" \
        "${PACA_ARGS[@]}"; then
        paca_training_failed openmmlab "$work_dir" "rerun with Remove_old=0 to resume it"
    fi
    paca_training_done "$work_dir"
}

# paca_openmmlab_test TASK ENTRY.py config checkpoint gpus nb_gpus port [others]
paca_openmmlab_test() {
    local task="$1" entry="$2"
    shift 2
    [[ $# -ge 5 ]] || paca_die "usage: $(basename "$0") config checkpoint gpus nb_gpus port [others]"
    local checkpoint="$2" gpus="$3" nb_gpus="$4" port="$5"
    _paca_task_config "$1" "$task"
    shift 5
    paca_take_flags "$@"
    paca_help_of "$PACAVIT_ROOT/$task/$entry"
    paca_check_openmmlab_command test "$task" "$PACA_CONFIG" "$checkpoint" "${PACA_ARGS[@]}"
    paca_select_devices "$gpus" "$nb_gpus" mmcv-ops
    paca_torchrun "$port" "$PACAVIT_ROOT/$task/$entry" "$PACA_CONFIG" "$checkpoint" "${PACA_ARGS[@]}" ||
        paca_evaluation_failed $?
}
