param([string]$Drive = 'X:')
. "$PSScriptRoot\common.ps1"
$v = Get-Volume -FilePath "$Drive\" -ErrorAction SilentlyContinue
$d = [IO.DriveInfo]::new($Drive)
Check 'free space is real' ($d.AvailableFreeSpace -gt 0 -and $d.AvailableFreeSpace -le $d.TotalSize) "$($d.AvailableFreeSpace) of $($d.TotalSize)"
Check 'file system name' ($d.DriveFormat -eq 'cairn') $d.DriveFormat
$serial = (cmd /c vol $Drive)[-1]
Set-Content "$env:TEMP\cairn-serial.txt" $serial
exit $script:Failures
