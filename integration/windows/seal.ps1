param([string]$Drive = 'X:')
. "$PSScriptRoot\common.ps1"
$f = "$Drive\seal-two-handles.txt"
$a = [IO.File]::Open($f, 'Create', 'ReadWrite', 'ReadWrite')
$b = [IO.File]::Open($f, 'Open', 'ReadWrite', 'ReadWrite')
$a.Write([byte[]](1..10), 0, 10); $a.Dispose()
Check 'no seal while a second handle is open' ((Versions '/seal-two-handles.txt').Count -eq 0) "$((Versions '/seal-two-handles.txt').Count) versions"
$b.Write([byte[]](11..20), 0, 10); $b.Dispose()
Start-Sleep -Milliseconds 500
Check 'one version after the last Cleanup' ((Versions '/seal-two-handles.txt').Count -eq 1) "$((Versions '/seal-two-handles.txt').Count) versions"
$r = [IO.File]::OpenRead($f); $null = $r.ReadByte(); $r.Dispose()
Check 'a read-only reopen makes no version' ((Versions '/seal-two-handles.txt').Count -eq 1) 'extra version'
# Mapped write: the section outlives the handle; its pages arrive later.
$m = "$Drive\mapped.bin"; [IO.File]::WriteAllBytes($m, [byte[]]::new(65536))
$mmf = [IO.MemoryMappedFiles.MemoryMappedFile]::CreateFromFile($m, 'Open')
$view = $mmf.CreateViewAccessor(); $view.Write(100, [byte]42); $view.Flush(); $view.Dispose(); $mmf.Dispose()
Start-Sleep -Seconds 1
Check 'a mapped write is sealed' ([IO.File]::ReadAllBytes($m)[100] -eq 42) 'byte 100 lost'
exit $script:Failures
