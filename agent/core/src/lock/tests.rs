use super::*;
use std::os::unix::fs::PermissionsExt;

#[test]
fn paths_are_the_hex_sha256_of_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let locks = LockDir::open(&dir.path().join("a/b")).expect("open");
    // sha256("abc")
    let stem = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    assert_eq!(
        locks.path_for("abc"),
        dir.path().join(format!("a/b/{stem}.lock"))
    );
    assert_eq!(
        locks.state_path_for("abc"),
        dir.path().join(format!("a/b/{stem}.state"))
    );
    assert!(is_key_stem(stem));
    assert!(!is_key_stem("abc"));
}

#[test]
fn open_creates_the_directory_private_to_the_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("locks");
    LockDir::open(&path).expect("open");
    let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
    // The umask may narrow the mode further, never widen it.
    assert_eq!(mode & !DIR_MODE, 0, "mode {mode:o}");
    LockDir::open(&path).expect("opening again is fine");
}

#[test]
fn written_state_reads_back_and_is_stamped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let locks = LockDir::open(dir.path()).expect("open");
    let Acquire::Acquired(mut lock) = locks.try_acquire("e/j").expect("acquire") else {
        panic!("fresh key must be free");
    };
    assert_eq!(lock.previous(), None);
    let mut state = LockState::new_running("e/j", "i-1", &token_hash("t"), 1);
    state.updated_at = "1970-01-01T00:00:00.000Z".to_owned();
    lock.write_state(&state).expect("write");
    let read = locks.read_state("e/j").expect("read").expect("some");
    assert_ne!(read.updated_at, state.updated_at, "updated_at is stamped");
    assert_eq!(read.token_hash, state.token_hash);
    assert_eq!(read.state, RunState::Running);
    let leftovers: Vec<_> = fs::read_dir(dir.path())
        .expect("list")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(TEMP_SUFFIX))
        .collect();
    assert!(leftovers.is_empty(), "no temp files left: {leftovers:?}");
}

#[test]
fn writing_another_keys_record_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let locks = LockDir::open(dir.path()).expect("open");
    let Acquire::Acquired(mut lock) = locks.try_acquire("e/j").expect("acquire") else {
        panic!("fresh key must be free");
    };
    let other = LockState::new_running("e/other", "i-1", "h", 1);
    assert!(matches!(
        lock.write_state(&other),
        Err(LockError::KeyMismatch { .. })
    ));
    assert!(matches!(
        lock.touch(),
        Err(LockError::NothingToTouch { .. })
    ));
    assert_eq!(locks.read_state("e/j").expect("read"), None);
}

#[test]
fn dropping_a_lock_frees_it_even_while_a_forked_child_shares_the_file() {
    // A forked child's copy of the descriptor is a dup of ours: same open file
    // description. Hold one open, as a child between fork and exec would.
    let dir = tempfile::tempdir().expect("tempdir");
    let locks = LockDir::open(dir.path()).expect("open");
    let Acquire::Acquired(lock) = locks.try_acquire("k").expect("acquire") else {
        panic!("fresh key must be free");
    };
    let child_copy = lock.file.file.try_clone().expect("dup");
    drop(lock);
    assert!(matches!(
        locks.try_acquire("k").expect("acquire after drop"),
        Acquire::Acquired(_)
    ));
    let Acquire::Acquired(lock) = locks.try_acquire("k").expect("acquire") else {
        panic!("free again");
    };
    let second_copy = lock.file.file.try_clone().expect("dup");
    lock.release().expect("release");
    assert!(matches!(
        locks.try_acquire("k").expect("acquire after release"),
        Acquire::Acquired(_)
    ));
    drop((child_copy, second_copy));
}

#[test]
fn a_lock_file_replaced_after_open_is_noticed() {
    // What try_acquire checks after locking: clean-up may unlink the file it opened.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("x.lock");
    let file = File::create(&path).expect("create");
    assert!(still_named_by(&file, &path).expect("check"));
    fs::remove_file(&path).expect("unlink");
    assert!(!still_named_by(&file, &path).expect("check gone"));
    File::create(&path).expect("recreate");
    assert!(!still_named_by(&file, &path).expect("check replaced"));
}

#[test]
fn a_corrupt_state_file_is_moved_aside_and_the_job_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let locks = LockDir::open(dir.path()).expect("open");
    fs::write(locks.state_path_for("e/j"), b"{\"lock_key\":").expect("write");
    let Ok(Acquire::Acquired(held)) = locks.try_acquire("e/j") else {
        panic!("a corrupt record must not block its job");
    };
    assert!(held.previous().is_none());
    assert!(!locks.state_path_for("e/j").exists());
    let aside: Vec<String> = fs::read_dir(dir.path())
        .expect("list")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains(".state.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        fs::read(dir.path().join(&aside[0])).expect("read aside"),
        b"{\"lock_key\":"
    );
}
